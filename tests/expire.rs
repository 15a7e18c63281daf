//! base-expire against a real PostgreSQL 15, on all three repositories (local disk, S3 on s3s-fs,
//! SSH on a real sshd): it deletes exactly the backups the policy lets go and exactly the WAL no
//! kept backup can need, and every backup it keeps still restores, by point-in-time recovery, to the
//! rows expected.
//!
//! - `--keep 2` over four backups with a timeline switch between the second and the third (a
//!   standby promoted): the two oldest go with exactly the WAL before the third's start, on both
//!   timelines; history files stay; `--dry-run` listed exactly that first; base-fetch of an expired
//!   backup exits 1 naming it; a point-in-time recovery from each kept one counts its rows.
//! - `--keep-within` with backups on both sides of the boundary, and a pinned backup older than all:
//!   the newest backup before the boundary stays (a recovery to the boundary starts there), older
//!   ones go, the pinned one stays with only its own WAL and restores to its consistency point;
//!   unpinned, it goes at the next run.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use walship::wal::parse_lsn;
use walship_tests::backups::{base_command, base_fetch, base_push};
use walship_tests::expire::{
    ExpireSetup, SEGMENT_SIZE, all_keys, archive_and_stop, base_expire, dry_run, expire_json, insert_batch, names_in,
    primary, promoted_standby, record, restored_count, segment_number, start_segment,
};
use walship_tests::pg::Cluster;
use walship_tests::repository::{Backend, ConfigLines};
use walship_tests::run;

walship_tests::every_backend!(keep_two_of_four_across_a_timeline_switch, keep_within_and_a_pinned_backup);

const ROWS_PER_BATCH: i64 = 1000;

fn stop_segment(record: &serde_json::Value) -> u64 {
    let lsn = parse_lsn(record["stop_lsn"].as_str().expect("stop_lsn")).expect("an LSN");
    lsn / u64::from(SEGMENT_SIZE)
}

/// The objects of backup `name`: its catalog record and everything under `backups/<name>/`.
fn backup_objects(keys: &BTreeSet<String>, name: &str) -> BTreeSet<String> {
    keys.iter()
        .filter(|k| **k == format!("catalog/{name}.json") || k.starts_with(&format!("backups/{name}/")))
        .cloned()
        .collect()
}

fn now_text(cluster: &Cluster) -> String {
    cluster.psql("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
}

/// Restores backup `name` with `extra` base-fetch flags and returns the rows of `t` it recovered.
fn restored_rows(repo_args: &[OsString], cwd: &Path, label: &str, name: &str, extra: &[&str]) -> i64 {
    restored_count(repo_args, cwd, label, name, extra, "select count(*) from t")
}

fn keep_two_of_four_across_a_timeline_switch(backend: Backend) {
    let label = backend.label();
    let setup = ExpireSetup::new(backend, "keep", ConfigLines::default());
    let (repo, repo_args, cwd) = (&setup.repo, &setup.repo_args, setup.store.path());

    // --- Four backups, the last two on timeline 2. ---
    let old = primary(&format!("{label}-expire-keep-tl1"), repo);
    insert_batch(&old, 1, ROWS_PER_BATCH);
    let (first, _) = base_push(&old, repo_args, cwd, &[]);
    insert_batch(&old, 2, ROWS_PER_BATCH);
    let (second, _) = base_push(&old, repo_args, cwd, &[]);
    insert_batch(&old, 3, ROWS_PER_BATCH);
    let new = promoted_standby(old, &format!("{label}-expire-keep-tl2"));
    assert_eq!(new.checkpoint_timeline(), 2);
    insert_batch(&new, 4, ROWS_PER_BATCH);
    let (third, _) = base_push(&new, repo_args, cwd, &[]);
    insert_batch(&new, 5, ROWS_PER_BATCH);
    std::thread::sleep(Duration::from_millis(1100));
    let target = now_text(&new);
    std::thread::sleep(Duration::from_millis(1100));
    let (fourth, _) = base_push(&new, repo_args, cwd, &[]);
    insert_batch(&new, 6, ROWS_PER_BATCH);
    archive_and_stop(new);

    // --- What may go: the two oldest backups and the WAL before the third's start, on both timelines. ---
    let before = all_keys(repo);
    let third_record = record(repo_args, cwd, &third);
    assert_eq!(third_record["timeline"], 2, "{third_record:#}");
    let boundary = start_segment(&third_record);
    let mut expected: BTreeSet<String> = &backup_objects(&before, &first) | &backup_objects(&before, &second);
    let old_wal: Vec<&String> = before
        .iter()
        .filter(|k| k.starts_with("wal/") && segment_number(k).is_some_and(|segment| segment < boundary))
        .collect();
    assert!(old_wal.iter().any(|k| k.contains("/00000001")), "timeline 1's WAL is in the way: {old_wal:?}");
    assert!(old_wal.iter().any(|k| k.ends_with(".partial")), "and its .partial segment: {old_wal:?}");
    expected.extend(old_wal.into_iter().cloned());
    let histories: Vec<&String> = before.iter().filter(|k| k.starts_with("wal/history/")).collect();
    assert!(!histories.is_empty(), "the promotion archived 00000002.history: {before:?}");

    // --- The dry run lists exactly that, and deletes nothing. ---
    assert_eq!(dry_run(repo_args, cwd, &["--keep", "2"]), expected, "--dry-run's list");
    assert_eq!(all_keys(repo), before, "a dry run deletes nothing");

    // --- The real run deletes exactly that. ---
    let report = expire_json(repo_args, cwd, &["--keep", "2"]);
    assert_eq!(names_in(&report, "expired"), [first.clone(), second.clone()], "{report:#}");
    assert_eq!(names_in(&report, "kept"), [third.clone(), fourth.clone()], "{report:#}");
    let after = all_keys(repo);
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    assert_eq!(gone, expected, "what the run deleted");
    assert!(after.is_subset(&before), "nothing new is left behind: {:?}", after.difference(&before));
    assert_eq!(report["wal_files"].as_u64(), Some(expected.iter().filter(|k| k.starts_with("wal/")).count() as u64));
    for history in histories {
        assert!(after.contains(history), "{history} was deleted");
    }

    // --- An expired backup is gone for base-fetch; each kept one restores. ---
    let scratch_dir = setup.store.mkdir("expired-restore");
    let refused = base_fetch(repo_args, cwd, &first, &scratch_dir.join("data"), &[]);
    assert_eq!(refused.code, Some(1), "base-fetch of an expired backup: {refused:#?}");
    assert!(refused.stderr.contains(&first), "the error names the backup: {}", refused.stderr);
    let at_target =
        restored_rows(repo_args, cwd, &format!("{label}-expire-keep-r3"), &third, &["--target-time", &target]);
    assert_eq!(at_target, 5 * ROWS_PER_BATCH, "from the third backup to the target time");
    let at_end = restored_rows(repo_args, cwd, &format!("{label}-expire-keep-r4"), &fourth, &[]);
    assert_eq!(at_end, 6 * ROWS_PER_BATCH, "from the fourth backup to the end of the archive");

    // --- A second run finds nothing due. ---
    let again = expire_json(repo_args, cwd, &["--keep", "2"]);
    assert_eq!((names_in(&again, "expired").len(), again["wal_files"].as_u64()), (0, Some(0)), "{again:#}");
}

/// A `--keep-within` window that reaches back to `boundary` (rounded up to whole seconds).
fn window_to(boundary: Instant) -> String {
    format!("{}s", boundary.elapsed().as_secs_f64().ceil() as u64)
}

fn keep_within_and_a_pinned_backup(backend: Backend) {
    let label = backend.label();
    let setup = ExpireSetup::new(backend, "within", ConfigLines::default());
    let (repo, repo_args, cwd) = (&setup.repo, &setup.repo_args, setup.store.path());

    // --- A pinned backup, two more, the boundary, two after it. ---
    let cluster = primary(&format!("{label}-expire-within"), repo);
    insert_batch(&cluster, 1, ROWS_PER_BATCH);
    let pin_args: Vec<OsString> = [&repo_args[..], &["--pin".into()]].concat();
    let (pinned, _) = base_push(&cluster, &pin_args, cwd, &[]);
    insert_batch(&cluster, 2, ROWS_PER_BATCH);
    let (older, _) = base_push(&cluster, repo_args, cwd, &[]);
    insert_batch(&cluster, 3, ROWS_PER_BATCH);
    let (before_boundary, _) = base_push(&cluster, repo_args, cwd, &[]);
    insert_batch(&cluster, 4, ROWS_PER_BATCH);
    // Wide gaps on both sides, because the window is given in whole seconds and a command runs a
    // moment after the window was worked out.
    std::thread::sleep(Duration::from_secs(3));
    let boundary_text = now_text(&cluster);
    let boundary = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    let (after_boundary, _) = base_push(&cluster, repo_args, cwd, &[]);
    insert_batch(&cluster, 5, ROWS_PER_BATCH);
    let (newest, _) = base_push(&cluster, repo_args, cwd, &[]);
    archive_and_stop(cluster);
    let listed = run(&mut base_command("base-list", repo_args, cwd));
    let pinned_row = listed.stdout.lines().find(|l| l.starts_with(&pinned)).unwrap_or_default().to_owned();
    assert!(pinned_row.ends_with("pinned"), "base-list shows the pin: {}", listed.stdout);

    // --- What may go: the backup older than the newest before the boundary, and the WAL before that
    // one's start, except the pinned backup's own range. ---
    let before = all_keys(repo);
    let (pinned_record, kept_record) = (record(repo_args, cwd, &pinned), record(repo_args, cwd, &before_boundary));
    let pinned_range = start_segment(&pinned_record)..=stop_segment(&pinned_record);
    let kept_from = start_segment(&kept_record);
    let mut expected = backup_objects(&before, &older);
    expected.extend(
        before
            .iter()
            .filter(|k| {
                k.starts_with("wal/") && segment_number(k).is_some_and(|s| s < kept_from && !pinned_range.contains(&s))
            })
            .cloned(),
    );
    assert!(expected.iter().any(|k| k.starts_with("wal/")), "WAL between the pin and the window goes: {before:?}");
    assert_eq!(dry_run(repo_args, cwd, &["--keep-within", &window_to(boundary)]), expected, "--dry-run's list");

    let report = expire_json(repo_args, cwd, &["--keep-within", &window_to(boundary)]);
    assert_eq!(names_in(&report, "expired"), [older], "{report:#}");
    assert_eq!(names_in(&report, "kept"), [&pinned, &before_boundary, &after_boundary, &newest].map(String::clone));
    let gone: BTreeSet<String> = before.difference(&all_keys(repo)).cloned().collect();
    assert_eq!(gone, expected, "what the run deleted");

    // --- The pinned backup restores to its consistency point; the one before the boundary to it. ---
    let at_pin = restored_rows(repo_args, cwd, &format!("{label}-expire-pin"), &pinned, &["--target-immediate"]);
    assert_eq!(at_pin, ROWS_PER_BATCH, "the pinned backup, consistent");
    let at_boundary = restored_rows(
        repo_args,
        cwd,
        &format!("{label}-expire-edge"),
        &before_boundary,
        &["--target-time", &boundary_text],
    );
    assert_eq!(at_boundary, 4 * ROWS_PER_BATCH, "from the newest backup before the boundary to the boundary");

    // --- Unpinned, it goes at the next run (with its WAL). ---
    let unpin = base_expire(repo_args, cwd, &["--unpin", &pinned]);
    assert_eq!(unpin.code, Some(0), "{unpin:#?}");
    let report = expire_json(repo_args, cwd, &["--keep-within", &window_to(boundary)]);
    assert_eq!(names_in(&report, "expired"), [pinned.as_str()], "{report:#}");
    let left = all_keys(repo);
    assert!(
        !left.iter().any(|k| k.starts_with("wal/") && segment_number(k).is_some_and(|s| s < kept_from)),
        "no WAL before the oldest kept backup is left: {left:?}"
    );
}
