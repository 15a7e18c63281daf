//! Which backups a retention policy keeps: pure decisions over the catalog, so that every rule of
//! "never delete" can be tested without a repository.
//!
//! Order is by `finished_at` (when a backup became usable), never by timeline or name: WAL-G once
//! sorted by timeline and deleted the newest backups after an upgrade (wal-g#636).
//!
//! Incremental backups: the policy counts restore points, whatever their kind, and then keeps the
//! whole chain of every incremental backup it keeps, so no kept backup ever loses a link. One whose
//! chain is already broken can never be restored: it is reported, counted for nothing and kept for
//! no one's sake.

use std::collections::HashMap;
use std::time::Duration;

use crate::base::catalog::chain_problem;
use crate::base::{BackupRecord, Lineage, MAX_CHAIN_LEN};

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
    /// The newest restorable backup: never deleted, whatever the policy.
    Newest,
    /// Among the `--keep N` newest restorable backups (or newer than the oldest of them).
    Count,
    /// Finished inside the `--keep-within` window, or the newest restorable one before it (recovery
    /// to the window's first moment starts there).
    Window,
    /// The newest backup the latest timeline can be restored from: after a point-in-time restore
    /// the newest backups may lie on the abandoned branch, and this one is then the only way back
    /// to the live timeline.
    LatestTimeline,
    /// Pinned: kept forever (with only the WAL that makes it consistent, unless kept otherwise).
    Pinned,
    /// Its `finished_at` does not parse, so it cannot be ordered; never deleted on a guess.
    Unordered,
    /// A kept incremental backup rests on it ([`Decision::needed_by`] names the children): a restore
    /// of that one combines every backup of its chain. `later_wal`: one of those children is kept for
    /// a reason that keeps the WAL after it, and so is this one's (then every link of the chain also
    /// restores to any later moment, and wal-verify sees no gap after it); kept only for pinned
    /// children, it keeps its own start-to-stop range, as a pin does.
    NeededBy {
        /// Whether the WAL after this backup stays too.
        later_wal: bool,
    },
    /// A base-push taking an incremental backup on top of it claims it (`catalog/<NAME>.needed-by-
    /// <CHILD>`, fresh, and no record of CHILD yet): found after the expiry mark was written.
    Claimed,
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
            Keep::NeededBy { .. } => "needed-by",
            Keep::Claimed => "claimed",
        }
    }

    /// Whether this reason keeps the WAL after the backup too (a pin keeps only its own range).
    pub fn keeps_later_wal(self) -> bool {
        match self {
            Keep::Pinned => false,
            Keep::NeededBy { later_wal } => later_wal,
            // The incremental backup being taken will be the newest, and its chain's WAL stays then.
            _ => true,
        }
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
    /// The kept incremental backups whose parent this one is (with [`Keep::NeededBy`] or
    /// [`Keep::Claimed`]), by name.
    pub needed_by: Vec<String>,
    /// Why it cannot be restored, for an incremental backup whose chain is broken (a parent missing
    /// from the catalog, or of another cluster): never a restore point the policy counts, never a
    /// reason to keep another backup.
    pub broken_chain: Option<String>,
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

    /// Adds `reason` (a [`Keep::NeededBy`] merges with one already there: the WAL after the backup
    /// stays when any child asks for it).
    pub fn keep(&mut self, reason: Keep) {
        if let Keep::NeededBy { later_wal } = reason {
            for kept in &mut self.kept {
                if let Keep::NeededBy { later_wal: earlier } = kept {
                    *earlier |= later_wal;
                    return;
                }
            }
        }
        if !self.kept.contains(&reason) {
            self.kept.push(reason);
        }
    }
}

/// Decides every backup's fate. `now` is Unix nanoseconds; `lineage` follows the newest timeline
/// (`None` when the repository's history cannot tell, and then that rule keeps nothing extra).
///
/// The policy counts restore points: full backups and incremental ones whose chain is whole alike
/// (`--keep 7` keeps seven nights, whichever kind each night took). A backup whose chain is broken
/// counts for nothing and anchors nothing; it stays while the newer side of the count or window
/// reaches it, and goes with the backups of its age. Then every ancestor of a kept incremental
/// backup stays, transitively ([`Keep::NeededBy`]).
pub fn decide(mut backups: Vec<Candidate>, policy: &Policy, now: i128, lineage: Option<Lineage>) -> Vec<Decision> {
    let finished = |c: &Candidate| c.record.finished_at_unix();
    backups.sort_by(|a, b| finished(a).cmp(&finished(b)).then_with(|| a.record.name.cmp(&b.record.name)));
    let broken = broken_chains(&backups);
    let mut decisions: Vec<Decision> = backups
        .into_iter()
        .zip(broken)
        .map(|(candidate, broken_chain)| Decision { candidate, kept: Vec::new(), needed_by: Vec::new(), broken_chain })
        .collect();
    let ordered: Vec<usize> = (0..decisions.len()).filter(|&i| finished(&decisions[i].candidate).is_some()).collect();
    // Positions in `ordered` of the restore points: the backups whose chain is whole.
    let usable: Vec<usize> = (0..ordered.len()).filter(|&p| decisions[ordered[p]].broken_chain.is_none()).collect();
    for decision in &mut decisions {
        if finished(&decision.candidate).is_none() {
            decision.keep(Keep::Unordered);
        }
        if decision.candidate.pinned {
            decision.keep(Keep::Pinned);
        }
    }
    if let Some(&newest) = usable.last() {
        decisions[ordered[newest]].keep(Keep::Newest);
    }
    if let Some(n) = policy.keep {
        let from = usable.len().checked_sub(n as usize).map_or(0, |first| usable[first]);
        for &i in &ordered[from..] {
            decisions[i].keep(Keep::Count);
        }
    }
    if let Some(window) = policy.keep_within {
        let boundary = now - window.as_nanos() as i128;
        let inside = ordered.partition_point(|&i| finished(&decisions[i].candidate).is_some_and(|t| t <= boundary));
        // The newest restore point at or before the boundary is where a recovery to the boundary starts.
        let from = usable.iter().rev().copied().find(|&p| p < inside).unwrap_or(inside);
        for &i in &ordered[from..] {
            decisions[i].keep(Keep::Window);
        }
    }
    if let Some(i) = newest_on_lineage(&decisions, &ordered, lineage) {
        decisions[i].keep(Keep::LatestTimeline);
    }
    keep_chains(&mut decisions);
    decisions
}

/// For each backup (in `backups`' order), why its chain is broken, judged within the catalog read.
fn broken_chains(backups: &[Candidate]) -> Vec<Option<String>> {
    let by_name: HashMap<&str, &BackupRecord> = backups.iter().map(|c| (c.record.name.as_str(), &c.record)).collect();
    backups.iter().map(|c| chain_problem(&c.record, |name| by_name.get(name).copied())).collect()
}

/// Keeps every ancestor of each kept incremental backup whose chain is whole.
fn keep_chains(decisions: &mut [Decision]) {
    let index: HashMap<String, usize> =
        decisions.iter().enumerate().map(|(i, d)| (d.candidate.record.name.clone(), i)).collect();
    for i in 0..decisions.len() {
        let own = &decisions[i];
        if own.broken_chain.is_some() || !own.kept.iter().any(|k| !matches!(k, Keep::NeededBy { .. })) {
            continue;
        }
        let later_wal = own.kept.iter().any(|k| !matches!(k, Keep::NeededBy { .. }) && k.keeps_later_wal());
        keep_ancestors(decisions, &index, i, Keep::NeededBy { later_wal });
    }
}

/// Gives every ancestor of `decisions[child]` the reason `reason`, each naming its own child. The
/// chain was judged whole, so every parent is there; one that is not ends the walk.
pub(super) fn keep_ancestors(decisions: &mut [Decision], index: &HashMap<String, usize>, child: usize, reason: Keep) {
    let mut child = child;
    for _ in 0..MAX_CHAIN_LEN {
        let Some(&parent) = decisions[child].candidate.record.parent.as_ref().and_then(|p| index.get(p)) else {
            return;
        };
        let name = decisions[child].candidate.record.name.clone();
        let decision = &mut decisions[parent];
        decision.keep(reason);
        if !decision.needed_by.contains(&name) {
            decision.needed_by.push(name);
        }
        child = parent;
    }
}

/// The newest restore point a recovery along `lineage` can start from, as `base-fetch LATEST` picks it.
fn newest_on_lineage(decisions: &[Decision], ordered: &[usize], lineage: Option<Lineage>) -> Option<usize> {
    let mut lineage = lineage?;
    let mut pick = None;
    for &i in ordered {
        let record = &decisions[i].candidate.record;
        if lineage.follow(record) {
            pick = None;
        }
        if lineage.excludes(record).is_none() && decisions[i].broken_chain.is_none() {
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

    /// Makes `candidate` an incremental backup on top of `parent`.
    fn on_top_of(candidate: &mut Candidate, parent: &str) {
        candidate.record.backup_type = crate::base::BackupType::Incremental;
        candidate.record.parent = Some(parent.to_owned());
        candidate.record.format_version = crate::base::INCREMENTAL_RECORD_FORMAT;
    }

    /// A weekly full and daily incrementals: full at 1 h, incrementals at 2 and 3 h (each on the
    /// previous one), a full at 4 h, an incremental at 5 h on it.
    fn two_chains() -> Vec<Candidate> {
        let mut backups = at_hours(&[1, 2, 3, 4, 5]);
        for (child, parent) in [(1, 0), (2, 1), (4, 3)] {
            let parent = backups[parent].record.name.clone();
            on_top_of(&mut backups[child], &parent);
        }
        backups
    }

    fn needed_by(decision: &Decision) -> Vec<&str> {
        decision.needed_by.iter().map(String::as_str).collect()
    }

    #[test]
    fn keep_counts_restore_points_and_keeps_each_kept_incrementals_whole_chain() {
        let decisions = decide(two_chains(), &Policy { keep: Some(2), keep_within: None }, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [3, 4], "{:?}", kept(&decisions));
        assert_eq!(decisions[3].kept, [Keep::Count, Keep::NeededBy { later_wal: true }]);
        assert_eq!(needed_by(&decisions[3]), [decisions[4].candidate.record.name.as_str()]);
        // Three restore points reach into the first chain: its middle link and, through it, its full.
        let decisions = decide(two_chains(), &Policy { keep: Some(3), keep_within: None }, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [0, 1, 2, 3, 4], "{:?}", kept(&decisions));
        assert_eq!(decisions[1].kept, [Keep::NeededBy { later_wal: true }], "{:?}", kept(&decisions));
        assert_eq!(decisions[0].kept, [Keep::NeededBy { later_wal: true }]);
        assert_eq!(needed_by(&decisions[0]), [decisions[1].candidate.record.name.as_str()], "the direct child");
        assert!(decisions[0].keeps_later_wal(), "the chain's WAL stays from its full backup on");
    }

    #[test]
    fn a_pinned_incremental_keeps_its_chain_with_only_their_own_wal() {
        let mut backups = two_chains();
        backups[2].pinned = true;
        let decisions = decide(backups, &Policy { keep: Some(1), keep_within: None }, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [0, 1, 2, 3, 4], "{:?}", kept(&decisions));
        for i in [0, 1] {
            assert_eq!(decisions[i].kept, [Keep::NeededBy { later_wal: false }], "{:?}", kept(&decisions));
            assert!(!decisions[i].keeps_later_wal());
        }
        // A child kept for a reason that keeps the later WAL wins over the pin's.
        let mut backups = two_chains();
        backups[1].pinned = true;
        let policy = Policy { keep: None, keep_within: Some(Duration::from_secs(7 * 3600 + 1800)) };
        let decisions = decide(backups, &policy, 10 * HOUR, None);
        assert_eq!(decisions[0].kept, [Keep::NeededBy { later_wal: true }], "{:?}", kept(&decisions));
    }

    #[test]
    fn keep_within_starts_from_the_newest_restore_point_before_the_boundary() {
        // Window from 3 h 30 on: the incremental at 3 h is where a recovery to the boundary starts,
        // and it needs the backups at 2 h and 1 h.
        let policy = Policy { keep: None, keep_within: Some(Duration::from_secs(6 * 3600 + 1800)) };
        let decisions = decide(two_chains(), &policy, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [0, 1, 2, 3, 4], "{:?}", kept(&decisions));
        assert_eq!(decisions[2].kept, [Keep::Window]);
    }

    #[test]
    fn a_broken_chain_is_reported_counts_for_nothing_and_keeps_nothing() {
        // The incremental at 3 h names a parent the catalog no longer has; the one at 5 h rests on it.
        let mut backups = at_hours(&[1, 2, 3, 4, 5]);
        on_top_of(&mut backups[2], "19700101T000000Z");
        let parent = backups[2].record.name.clone();
        on_top_of(&mut backups[4], &parent);
        let decisions = decide(backups.clone(), &Policy { keep: Some(1), keep_within: None }, 10 * HOUR, None);
        let broken: Vec<usize> = (0..5).filter(|&i| decisions[i].broken_chain.is_some()).collect();
        assert_eq!(broken, [2, 4], "{:?}", decisions.iter().map(|d| &d.broken_chain).collect::<Vec<_>>());
        assert!(decisions[4].broken_chain.as_deref().unwrap().contains("19700101T000000Z"));
        // The newest restore point is the full backup at 4 h; the broken newer one stays beside it
        // (the count reaches it), its broken parent does not.
        assert_eq!(decisions[3].kept, [Keep::Newest, Keep::Count], "{:?}", kept(&decisions));
        assert_eq!(decisions[4].kept, [Keep::Count]);
        assert!(!decisions[2].is_kept(), "{:?}", kept(&decisions));
        // Two restore points: the broken one between them takes no slot.
        let decisions = decide(backups, &Policy { keep: Some(2), keep_within: None }, 10 * HOUR, None);
        assert_eq!(names_kept(&decisions), [1, 2, 3, 4], "{:?}", kept(&decisions));
        assert!(decisions[0].needed_by.is_empty() && !decisions[0].is_kept());
    }
}
