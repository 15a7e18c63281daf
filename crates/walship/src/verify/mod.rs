//! wal-verify and base-verify: what a repository's owner asks from cron, "is the archive whole, and
//! does a backup really restore?", answered with findings a person can act on and figures a
//! monitoring system can read.
//!
//! A verify command has three outcomes, and scripts must be able to tell them apart:
//! - healthy: it checked everything it was asked to and found nothing (exit 0);
//! - problems found: it checked, and [`Finding`]s say what is wrong (exit
//!   [`crate::ExitCode::ProblemsFound`]), whatever else it could not check;
//! - could not check: the repository was unreachable, the configuration bad... (an [`crate::Error`]
//!   with its own exit code): nothing is known about the archive's health.
//!
//! Verifying never writes into the repository: every check reads, and a restore test restores into a
//! scratch directory of its own with archiving off. The one exception is asked for by name:
//! `wal-verify --probe-writes` writes and removes a scratch object under `probe/`.

pub mod backup;
pub mod metrics;
pub mod restore_test;
pub mod scratch;
pub mod wal;

use serde::Serialize;

/// What kind of problem a [`Finding`] is; its `snake_case` name is what `--json` and the metrics carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// Segments missing between a backup's start and the newest archived segment on its timelines.
    Gap,
    /// Segments missing between a backup's start and stop: the backup can never become consistent.
    IncompleteBackupWal,
    /// A timeline has WAL (or a backup, or descendants) but no history file.
    MissingHistory,
    /// A history file disagrees with the segments present or with its parent's history.
    HistoryMismatch,
    /// The newest archived segment is older than `--max-age`: archiving has stalled.
    StaleArchive,
    /// A stored object failed verification against its checksum, or is not what its name says.
    DamagedObject,
    /// The repository holds no complete base backup: nothing can be restored.
    NoBackups,
    /// A backup part failed verification against its trailer or the catalog record.
    DamagedPart,
    /// The stored backup_manifest disagrees with the catalog record.
    ManifestMismatch,
    /// Restoring the backup and starting PostgreSQL on it failed.
    RestoreTestFailed,
    /// An incremental backup's chain is broken (a parent missing from the catalog, not older than
    /// its child, or of another cluster; a chain that does not begin with a full backup): it can
    /// never be restored.
    BrokenChain,
    /// The store does not refuse a create of an existing key (`If-None-Match: *` ignored, or never
    /// found out): two writers of one name at once can both be told they succeeded.
    ConditionalWritesIgnored,
}

impl FindingKind {
    /// Every kind, in order: the metrics carry a zero for each kind not found, so that an alert on
    /// `walship_verify_findings > 0` needs no absent-series rule.
    pub const ALL: [FindingKind; 12] = [
        FindingKind::Gap,
        FindingKind::IncompleteBackupWal,
        FindingKind::MissingHistory,
        FindingKind::HistoryMismatch,
        FindingKind::StaleArchive,
        FindingKind::DamagedObject,
        FindingKind::NoBackups,
        FindingKind::DamagedPart,
        FindingKind::ManifestMismatch,
        FindingKind::RestoreTestFailed,
        FindingKind::BrokenChain,
        FindingKind::ConditionalWritesIgnored,
    ];

    /// The name `--json` and the metrics use.
    pub fn label(self) -> &'static str {
        match self {
            FindingKind::Gap => "gap",
            FindingKind::IncompleteBackupWal => "incomplete_backup_wal",
            FindingKind::MissingHistory => "missing_history",
            FindingKind::HistoryMismatch => "history_mismatch",
            FindingKind::StaleArchive => "stale_archive",
            FindingKind::DamagedObject => "damaged_object",
            FindingKind::NoBackups => "no_backups",
            FindingKind::DamagedPart => "damaged_part",
            FindingKind::ManifestMismatch => "manifest_mismatch",
            FindingKind::RestoreTestFailed => "restore_test_failed",
            FindingKind::BrokenChain => "broken_chain",
            FindingKind::ConditionalWritesIgnored => "conditional_writes_ignored",
        }
    }
}

/// One problem a verify command found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What kind of problem.
    pub kind: FindingKind,
    /// What it concerns, for scripts: an object key, a backup name, a range of segment names
    /// (`FIRST..LAST`), a timeline.
    pub subject: String,
    /// One line for people, naming the file(s) and the cause.
    pub message: String,
}

impl Finding {
    /// A finding of `kind` about `subject`.
    pub fn new(kind: FindingKind, subject: impl Into<String>, message: impl Into<String>) -> Self {
        Finding { kind, subject: subject.into(), message: message.into() }
    }
}

/// How many findings of each kind, in kind order: for the summary line and the metrics.
pub fn count_by_kind(findings: &[Finding]) -> std::collections::BTreeMap<FindingKind, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for finding in findings {
        *counts.entry(finding.kind).or_default() += 1;
    }
    counts
}
