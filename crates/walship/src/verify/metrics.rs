//! The verify commands' figures in Prometheus' text format, written for node_exporter's textfile
//! collector: the convention for cron jobs, which cannot be scraped themselves.
//!
//! Every metric is defined here, once, with its help text: node_exporter merges the files of
//! wal-verify and base-verify, and refuses a metric whose help differs between two files, or a
//! series (name and labels) that two files both carry. So the two commands share only the
//! `walship_verify_*` metrics, told apart by their `command` label; each other metric belongs to one
//! command. Every series carries a `repository` label (the repository's URL, which holds no secret),
//! so that one host can verify several repositories.
//!
//! The file is replaced atomically (a temporary file beside it, then a rename): the collector never
//! reads half a file.

use std::fmt::Write as _;
use std::path::Path;

use crate::error::Error;

/// A gauge: its name and help text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauge {
    /// The metric's name.
    pub name: &'static str,
    /// Its `# HELP` text.
    pub help: &'static str,
}

const fn gauge(name: &'static str, help: &'static str) -> Gauge {
    Gauge { name, help }
}

/// 1: the check ran and found nothing; 0: it found problems or could not check (label `command`).
pub const VERIFY_HEALTHY: Gauge =
    gauge("walship_verify_healthy", "1 if the last run found no problem, 0 if it found problems or could not check");
/// 1: the check ran to its end; 0: it could not check (repository unreachable, bad configuration).
pub const VERIFY_COMPLETED: Gauge =
    gauge("walship_verify_completed", "1 if the last run could check the repository, 0 if it could not");
/// Problems of each kind the last run found (labels `command`, `kind`).
pub const VERIFY_FINDINGS: Gauge = gauge("walship_verify_findings", "Problems the last run found, by kind");
/// How long the last run took.
pub const VERIFY_DURATION: Gauge = gauge("walship_verify_duration_seconds", "How long the last run took");
/// When the last run ended (Unix time): a stale file means the cron job itself stopped.
pub const VERIFY_TIMESTAMP: Gauge = gauge("walship_verify_timestamp_seconds", "When the last run ended (Unix time)");

/// wal-verify: the age of the newest archived segment.
pub const WAL_NEWEST_AGE: Gauge =
    gauge("walship_wal_newest_segment_age_seconds", "Age of the newest archived WAL segment when the check ran");
/// wal-verify: when the newest archived segment was stored (Unix time).
pub const WAL_NEWEST_TIMESTAMP: Gauge = gauge(
    "walship_wal_newest_segment_timestamp_seconds",
    "When the newest archived WAL segment was stored (Unix time)",
);
/// wal-verify: ranges of segments missing where a backup's recovery needs them.
pub const WAL_GAPS: Gauge =
    gauge("walship_wal_gaps", "Ranges of WAL segments missing where a backup's recovery needs them");
/// wal-verify: segments missing in those ranges.
pub const WAL_MISSING_SEGMENTS: Gauge =
    gauge("walship_wal_missing_segments", "WAL segments missing where a backup's recovery needs them");
/// wal-verify: WAL objects (segments, history, .partial, .backup files) in the repository.
pub const WAL_OBJECTS: Gauge = gauge("walship_wal_objects", "WAL objects in the repository");
/// wal-verify --deep: objects read and checked against their checksums.
pub const WAL_OBJECTS_VERIFIED: Gauge =
    gauge("walship_wal_objects_verified", "WAL objects read and checked against their checksums (--deep)");
/// wal-verify --deep: objects that failed.
pub const WAL_OBJECTS_DAMAGED: Gauge =
    gauge("walship_wal_objects_damaged", "WAL objects that failed verification (--deep)");

/// base-verify: complete backups in the catalog.
pub const BACKUPS: Gauge = gauge("walship_backups", "Complete base backups in the catalog");
/// base-verify: the age of the newest complete backup (from its finished_at).
pub const BACKUP_NEWEST_AGE: Gauge =
    gauge("walship_backup_newest_age_seconds", "Age of the newest complete base backup when the check ran");
/// base-verify: a backup's size before compression (label `backup`).
pub const BACKUP_ORIGINAL_BYTES: Gauge =
    gauge("walship_backup_original_bytes", "A base backup's size before compression");
/// base-verify: a backup's size in the repository (label `backup`).
pub const BACKUP_STORED_BYTES: Gauge = gauge("walship_backup_stored_bytes", "A base backup's size in the repository");
/// base-verify: 1 if a verified backup's parts and manifest passed (label `backup`).
pub const BACKUP_VERIFIED: Gauge =
    gauge("walship_backup_verify_healthy", "1 if the backup's parts and manifest passed verification, else 0");
/// base-verify --restore-test: 1 if the restore test passed (label `backup`).
pub const RESTORE_TEST_HEALTHY: Gauge =
    gauge("walship_restore_test_healthy", "1 if restoring the backup and starting PostgreSQL on it worked, else 0");
/// base-verify --restore-test: the measured recovery time objective (label `backup`).
pub const RESTORE_TEST_RTO: Gauge = gauge(
    "walship_restore_test_rto_seconds",
    "Download, extract, verify and replay until PostgreSQL accepted connections: the measured RTO",
);
/// base-verify --restore-test: each step's time (labels `backup`, `step`).
pub const RESTORE_TEST_STEP: Gauge =
    gauge("walship_restore_test_step_seconds", "Time of each step of the restore test");
/// base-verify --restore-test: when the restore test ended (Unix time).
pub const RESTORE_TEST_TIMESTAMP: Gauge =
    gauge("walship_restore_test_timestamp_seconds", "When the last restore test ended (Unix time)");

/// A set of samples, rendered grouped by metric in the order each metric was first set.
#[derive(Debug, Clone)]
pub struct Metrics {
    repository: String,
    families: Vec<(Gauge, Vec<(String, f64)>)>,
}

impl Metrics {
    /// Samples of `repository` (its URL): every series carries it as the `repository` label.
    pub fn new(repository: &str) -> Self {
        Metrics { repository: repository.to_owned(), families: Vec::new() }
    }

    /// Sets `gauge` with `labels` (besides `repository`) to `value`.
    pub fn set(&mut self, gauge: Gauge, labels: &[(&str, &str)], value: f64) {
        let mut rendered = format!("repository=\"{}\"", escape(&self.repository));
        for (name, value) in labels {
            let _ = write!(rendered, ",{name}=\"{}\"", escape(value));
        }
        let family = match self.families.iter().position(|(g, _)| g.name == gauge.name) {
            Some(index) => &mut self.families[index].1,
            None => {
                self.families.push((gauge, Vec::new()));
                &mut self.families.last_mut().expect("just pushed").1
            }
        };
        match family.iter_mut().find(|(l, _)| *l == rendered) {
            Some(sample) => sample.1 = value,
            None => family.push((rendered, value)),
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        for (gauge, samples) in &self.families {
            let _ = writeln!(text, "# HELP {} {}", gauge.name, gauge.help);
            let _ = writeln!(text, "# TYPE {} gauge", gauge.name);
            for (labels, value) in samples {
                let _ = writeln!(text, "{}{{{labels}}} {}", gauge.name, number(*value));
            }
        }
        text
    }

    /// Replaces `path` with [`Metrics::render`], atomically.
    pub fn write(&self, path: &Path) -> Result<(), Error> {
        crate::fs::replace_file(path, self.render().as_bytes(), true)
            .map_err(|e| Error::local_io(path, "write metrics", e))
    }
}

/// Sets the `walship_verify_*` metrics of one run of `command`: `findings` is `None` when it could
/// not check.
pub fn set_outcome(
    metrics: &mut Metrics,
    command: &str,
    findings: Option<&[super::Finding]>,
    took: std::time::Duration,
) {
    let healthy = findings.is_some_and(<[_]>::is_empty);
    metrics.set(VERIFY_HEALTHY, &[("command", command)], f64::from(u8::from(healthy)));
    metrics.set(VERIFY_COMPLETED, &[("command", command)], f64::from(u8::from(findings.is_some())));
    if let Some(findings) = findings {
        let counts = super::count_by_kind(findings);
        for kind in super::FindingKind::ALL {
            let count = counts.get(&kind).copied().unwrap_or(0);
            metrics.set(VERIFY_FINDINGS, &[("command", command), ("kind", kind.label())], count as f64);
        }
    }
    metrics.set(VERIFY_DURATION, &[("command", command)], took.as_secs_f64());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    metrics.set(VERIFY_TIMESTAMP, &[("command", command)], now.as_secs() as f64);
}

/// A label value as the format wants it: backslash, double quote and line feed escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Whole numbers without a fraction, others with millisecond precision at most.
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        let text = format!("{value:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_group_under_one_help_and_labels_are_escaped() {
        let mut metrics = Metrics::new("s3://bucket/x");
        metrics.set(BACKUP_STORED_BYTES, &[("backup", "A")], 10.0);
        metrics.set(BACKUPS, &[], 2.0);
        metrics.set(BACKUP_STORED_BYTES, &[("backup", "B\"\\\n")], 20.0);
        metrics.set(BACKUP_STORED_BYTES, &[("backup", "A")], 11.0);
        metrics.set(VERIFY_DURATION, &[("command", "base-verify")], 1.23456);
        assert_eq!(
            metrics.render(),
            "# HELP walship_backup_stored_bytes A base backup's size in the repository\n\
             # TYPE walship_backup_stored_bytes gauge\n\
             walship_backup_stored_bytes{repository=\"s3://bucket/x\",backup=\"A\"} 11\n\
             walship_backup_stored_bytes{repository=\"s3://bucket/x\",backup=\"B\\\"\\\\\\n\"} 20\n\
             # HELP walship_backups Complete base backups in the catalog\n\
             # TYPE walship_backups gauge\n\
             walship_backups{repository=\"s3://bucket/x\"} 2\n\
             # HELP walship_verify_duration_seconds How long the last run took\n\
             # TYPE walship_verify_duration_seconds gauge\n\
             walship_verify_duration_seconds{repository=\"s3://bucket/x\",command=\"base-verify\"} 1.235\n"
        );
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walship.prom");
        std::fs::write(&path, "old").unwrap();
        let mut metrics = Metrics::new("file:///r");
        metrics.set(WAL_GAPS, &[], 0.0);
        metrics.write(&path).unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("walship_wal_gaps{repository=\"file:///r\"} 0\n"));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("walship.prom")], "no temporary file left");
    }
}
