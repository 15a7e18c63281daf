//! Point-in-time recovery against a real PostgreSQL 15: the cluster archives through `wal-push` under
//! a pgbench load, is lost, and comes back from a base backup through `wal-fetch` to a target time
//! with exact row counts; the restored cluster, promoted onto timeline 2, keeps archiving into the
//! same repository, and a second restore with `recovery_target_timeline = 'latest'` follows the
//! history file to the end of timeline 2.
//!
//! The scenario runs on every backend (`every_backend!`): a repository on local disk (`--repo DIR`),
//! one in an S3 bucket served by s3s-fs on 127.0.0.1 and one on a real sshd (both named by
//! `--config FILE`). Each keeps every object as a plain file on this machine, so all three tests
//! look into the repository the same way.
//!
//! The WAL segment size is 1 MiB, so that many segments flow through the archive in a short run and
//! the non-default size is exercised end to end.

use std::fs;
use std::path::Path;
use std::time::Duration;

use walship_tests::Scratch;
use walship_tests::pg::{Cluster, WAIT_TIMEOUT, prefetch_workers};
use walship_tests::repository::{Backend, Repository};
use walship_tests::segments::{self, wal_key};

const SEGMENT_SIZE: u32 = 1024 * 1024;

/// Whether the repository holds the WAL file `wal_name`.
fn has_wal(repo: &Repository, wal_name: &str) -> bool {
    repo.object_file(&wal_key(wal_name)).is_file()
}

fn segment_name(timeline: u32, number: u64) -> String {
    segments::segment_name(timeline, number, SEGMENT_SIZE)
}

/// Every segment name from `first` to `last`, both included, on the timeline of `first`.
fn segments_between(first: &str, last: &str) -> Vec<String> {
    segments::segments_between(first, last, SEGMENT_SIZE)
}

/// Parses an LSN as PostgreSQL prints it (`0/1A2B3C8`).
fn parse_lsn(lsn: &str) -> u64 {
    let (hi, lo) = lsn.split_once('/').unwrap_or_else(|| panic!("LSN {lsn:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The first segment a base backup needs, from its backup_label.
fn backup_start_segment(backup: &Path) -> String {
    let label = fs::read_to_string(backup.join("backup_label")).expect("backup_label in the base backup");
    // START WAL LOCATION: 0/2000028 (file 000000010000000000000002)
    let line = label.lines().find(|l| l.starts_with("START WAL LOCATION:")).expect("START WAL LOCATION line");
    let file = line.split("(file ").nth(1).and_then(|rest| rest.strip_suffix(')'));
    file.unwrap_or_else(|| panic!("unexpected backup_label line {line:?}")).to_owned()
}

fn count(cluster: &Cluster, batch: &str) -> u64 {
    cluster.psql(&format!("select count(*) from marks where batch = '{batch}'")).parse().unwrap()
}

fn balance(cluster: &Cluster) -> String {
    cluster.psql("select sum(abalance) from pgbench_accounts")
}

fn assert_no_failed_archiving(cluster: &Cluster) {
    let stats = cluster.psql("select failed_count, coalesce(last_failed_wal, '') from pg_stat_archiver");
    assert_eq!(
        stats,
        "0|",
        "cluster {} failed to archive (failed_count|last_failed_wal)\n{}",
        cluster.name(),
        cluster.log_tail()
    );
}

/// The lines PostgreSQL logs for each file it got from restore_command.
fn restored_files(log: &str) -> Vec<&str> {
    log.lines()
        .filter_map(|line| line.split("restored log file \"").nth(1))
        .filter_map(|rest| rest.split_once("\" from archive"))
        .map(|(name, _)| name)
        .collect()
}

/// Asserts that PostgreSQL restored every one of `expected` from the archive, and that wal-fetch
/// reported no error (an error would end or stop the recovery).
fn assert_restored_from_archive(cluster: &Cluster, expected: &[String]) {
    let log = cluster.log_contents();
    let restored = restored_files(&log);
    let missing: Vec<&String> = expected.iter().filter(|name| !restored.contains(&name.as_str())).collect();
    assert!(
        missing.is_empty(),
        "cluster {}: not restored from the archive: {missing:?}\nrestored: {restored:?}\n{}",
        cluster.name(),
        cluster.log_tail()
    );
    let wal_fetch_restored = log.lines().filter(|l| l.starts_with("wal-fetch: restored ")).count();
    assert!(
        wal_fetch_restored >= expected.len(),
        "cluster {}: {wal_fetch_restored} 'wal-fetch: restored' lines for {} files\n{}",
        cluster.name(),
        expected.len(),
        cluster.log_tail()
    );
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("wal-fetch: error")).collect();
    assert!(errors.is_empty(), "cluster {}: wal-fetch failed: {errors:#?}", cluster.name());
}

/// Asserts that wal-push answered some calls from its look-ahead: PostgreSQL asked for segments that
/// an earlier call had already uploaded, and got its answer from the local record.
fn assert_look_ahead_used(cluster: &Cluster) {
    let log = cluster.log_contents();
    let batches = log.lines().filter(|l| l.starts_with("wal-push: archived ") && l.contains(" ahead")).count();
    let answered = log.lines().filter(|l| l.contains("was archived ahead by an earlier call")).count();
    assert!(
        batches >= 1 && answered >= 1,
        "cluster {}: look-ahead unused ({batches} calls uploaded ahead, {answered} answered from records)\n{}",
        cluster.name(),
        cluster.log_tail()
    );
}

/// Asserts that recovery took segments from the prefetch spool, and that once recovery ended the
/// worker exited by itself and removed its spool.
fn assert_prefetch_used_and_gone(cluster: &Cluster) {
    let log = cluster.log_contents();
    let prefetched = log.lines().filter(|l| l.starts_with("wal-fetch: restored ") && l.contains("prefetched")).count();
    assert!(
        prefetched >= 1,
        "cluster {}: no segment came from the prefetch spool\n{}",
        cluster.name(),
        cluster.log_tail()
    );
    let spool_root = cluster.data_dir().join("pg_wal/walship/prefetch");
    let deadline = std::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        let workers = prefetch_workers(cluster.data_dir());
        let spools: Vec<_> =
            fs::read_dir(&spool_root).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        if workers.is_empty() && spools.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cluster {}: after recovery ended, prefetch workers {workers:?} still run, spools {spools:?} remain",
            cluster.name()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sleep_past_clock_tick() {
    // Commit timestamps have microsecond resolution, but a clear gap on either side of the target
    // keeps the test independent of clock granularity and of which record recovery stops at.
    std::thread::sleep(Duration::from_millis(1100));
}

walship_tests::every_backend!(also_encrypted: pitr_to_target_time_then_new_timeline_then_latest);

/// The whole scenario against a new repository of kind `backend`, with the base backup beside it;
/// the backend's label tells the clusters of one run from those of another in names and messages.
fn pitr_to_target_time_then_new_timeline_then_latest(backend: Backend) {
    let label = backend.label();
    let store = Scratch::new(&format!("pitr-{label}"));
    let repo = &Repository::new(backend, &store);
    let backup = store.mkdir("base");
    let archiving = repo.archive_command();
    let fetching = repo.restore_command();

    // --- The original cluster, archiving through wal-push. ---
    let mut primary = Cluster::init(&format!("{label}-primary"), Some(1));
    primary.configure(&[("wal_level", "replica"), ("archive_mode", "on"), ("archive_command", &archiving)]);
    primary.start();
    assert_eq!(primary.psql("show wal_segment_size"), "1MB");
    primary.pgbench(&["-i", "-s", "5", "-q"]);
    primary.psql("create table marks(batch text, n int)");

    // No WAL in the backup: every segment the restores replay has to come through wal-fetch.
    primary.base_backup(&backup, &["-Fp", "-X", "none"]);
    let first_segment = backup_start_segment(&backup);

    // Archiving pauses while the load runs, as when the archive is slow or unreachable for a
    // while: the backlog of .ready segments it leaves is what wal-push's look-ahead works through.
    primary.psql("alter system set archive_command = ''");
    primary.psql("select pg_reload_conf()");
    primary.pgbench(&["-T", "5", "-c", "2", "-j", "2"]);
    primary.psql("insert into marks select 'A', g from generate_series(1, 1000) g");
    let balance_at_target = balance(&primary);
    sleep_past_clock_tick();
    let target = primary.psql("select now()");
    sleep_past_clock_tick();
    // Batch B commits after this position, so recovery to the target must read at least up to here.
    let before_b = primary.psql("select pg_walfile_name(pg_current_wal_insert_lsn())");
    primary.psql("insert into marks select 'B', g from generate_series(1, 500) g");
    assert_eq!((count(&primary, "A"), count(&primary, "B")), (1000, 500));
    primary.psql("alter system reset archive_command");
    primary.psql("select pg_reload_conf()");
    let last_segment = primary.switch_wal();
    primary.wait_archived(&last_segment, WAIT_TIMEOUT);
    assert_no_failed_archiving(&primary);
    assert_look_ahead_used(&primary);

    let timeline1 = segments_between(&first_segment, &last_segment);
    // How many segments the load fills depends on the machine's speed; any number above one proves
    // that archiving went on while the load ran.
    assert!(timeline1.len() > 1, "expected several 1 MiB segments under load, got {timeline1:?}");
    let unarchived: Vec<&String> = timeline1.iter().filter(|name| !has_wal(repo, name)).collect();
    assert!(unarchived.is_empty(), "segments missing from the repository: {unarchived:?}\n{}", repo.describe());
    assert!(repo.object_file("repository.json").is_file(), "no repository.json in the {}", repo.describe());

    // --- Lose it; restore to the target time. ---
    primary.crash();
    drop(primary);

    let mut restored = Cluster::restore(
        &format!("{label}-pitr"),
        &backup,
        &[("restore_command", &fetching), ("recovery_target_time", &target), ("recovery_target_action", "promote")],
    );
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(count(&restored, "A"), 1000, "batch A committed before the target");
    assert_eq!(count(&restored, "B"), 0, "batch B committed after the target");
    assert_eq!(balance(&restored), balance_at_target, "pgbench balances at the target");
    assert_eq!(restored.checkpoint_timeline(), 2, "promoted onto a new timeline");
    assert_restored_from_archive(&restored, &segments_between(&first_segment, &before_b));
    assert_prefetch_used_and_gone(&restored);
    assert!(
        restored.log_contents().contains("recovery stopping before commit of transaction"),
        "recovery did not stop at the target time\n{}",
        restored.log_tail()
    );

    // The restored copy kept archive_command: the new timeline's history file goes to the same
    // repository. (No .partial segment here: the old timeline's last segment came from the archive,
    // so PostgreSQL has nothing new to archive for it.)
    restored.wait_archived("00000002.history", WAIT_TIMEOUT);
    assert!(has_wal(repo, "00000002.history"), "00000002.history not in the {}", repo.describe());
    let history = fs::read_to_string(restored.data_dir().join("pg_wal/00000002.history")).unwrap();
    // "1	0/1A2B3C8	before transaction 1234 at 2024-..."
    let switch_point = history
        .lines()
        .find_map(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("unexpected 00000002.history: {history:?}"));
    let switch_segment = parse_lsn(switch_point) / u64::from(SEGMENT_SIZE);

    restored.psql("insert into marks select 'C', g from generate_series(1, 300) g");
    let last_on_timeline2 = restored.switch_wal();
    assert!(last_on_timeline2.starts_with("00000002"), "{last_on_timeline2}");
    restored.wait_archived(&last_on_timeline2, WAIT_TIMEOUT);
    assert_no_failed_archiving(&restored);
    assert!(has_wal(repo, &last_on_timeline2), "{last_on_timeline2} not in the {}", repo.describe());

    // --- Lose that one too; restore the same base backup to the end of the latest timeline. ---
    restored.crash();
    drop(restored);

    let mut latest = Cluster::restore(
        &format!("{label}-latest"),
        &backup,
        &[("restore_command", &fetching), ("recovery_target_timeline", "latest")],
    );
    latest.start();
    latest.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(
        (count(&latest, "A"), count(&latest, "B"), count(&latest, "C")),
        (1000, 0, 300),
        "batches A, B, C after following timeline 2 to its end"
    );
    assert_eq!(balance(&latest), balance_at_target);
    assert_eq!(latest.checkpoint_timeline(), 3, "promoted onto the timeline after 2");
    let mut expected = vec!["00000002.history".to_owned()];
    expected.extend(segments_between(&segment_name(2, switch_segment), &last_on_timeline2));
    assert_restored_from_archive(&latest, &expected);
    assert_prefetch_used_and_gone(&latest);
    latest.wait_archived("00000003.history", WAIT_TIMEOUT);
    assert_no_failed_archiving(&latest);
}
