//! base-expire where retention tools lose data: killed half-way, beside a backup still being written,
//! two runs at once, beside a cluster archiving under load, and fed bad input. Each scenario checks
//! the repository itself afterwards (every listed backup restores, nothing that should stay went).
//!
//! - Kills (every backend): a run aborted at each step of its order (mark written; record gone;
//!   first page of parts gone; backups gone, WAL not yet) leaves every listed backup complete
//!   (base-fetch verifies it), and a rerun finishes the work: it names the interrupted removal,
//!   leaves no expiry mark and no object of the expired backup; PostgreSQL started on the oldest
//!   backup left then recovers every row.
//! - A backup being written (local disk): base-push throttled, base-expire --keep 1 runs while it
//!   uploads; none of its objects or of the WAL from its start goes, and it finishes and restores.
//! - Concurrency (local disk): two runs at once end as one run would (as --dry-run predicted);
//!   runs beside wal-push and base-push under pgbench load lose no row of a recovery.
//! - Bad input: each a one-line error with its documented exit code, and the repository unchanged.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use walship_tests::assertions::assert_error;
use walship_tests::backups::{base_fetch, base_push, base_push_command};
use walship_tests::expire::{
    ExpireSetup, all_keys, archive_and_stop, base_expire, base_expire_command, dry_run, expire_json, insert_batch,
    listed_names, names_in, primary, record, report_of, restored_count, resumed_in, start_segment, wal_from,
};
use walship_tests::pg::WAIT_TIMEOUT;
use walship_tests::repository::{Backend, ConfigLines, Repository};
use walship_tests::running::{finish, spawn};
use walship_tests::{Output, Scratch};

walship_tests::every_backend!(a_kill_at_each_step_leaves_listed_backups_restorable_and_a_rerun_finishes);

const ROWS_PER_BATCH: i64 = 1000;
const FAILPOINT: &str = "WALSHIP_TEST_FAILPOINT";
/// Bound on a base-expire, base-push or pgbench run in the background.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// The steps of a run, in its order, at which the kill scenario aborts one.
const STEPS: [&str; 4] = ["base-expire:marked", "base-expire:unlisted", "base-expire:parts", "base-expire:wal"];

fn repo_args_of(config: &Path) -> Vec<OsString> {
    vec!["--config".into(), config.into()]
}

/// base-expire with `args`, aborted at `step` as a kill would end it.
#[track_caller]
fn killed_at(repo_args: &[OsString], cwd: &Path, step: &str, args: &[&str]) -> Output {
    let mut cmd = base_expire_command(repo_args, cwd, args);
    cmd.env(FAILPOINT, format!("{step}:abort"));
    let out = walship_tests::run(&mut cmd);
    assert_eq!(out.code, None, "base-expire {args:?} should have been killed at {step}: {out:#?}");
    out
}

/// Every backup base-list lists is complete: base-fetch (which runs pg_verifybackup) restores each
/// into a fresh directory. PostgreSQL is not started: that is the end of the scenario's job.
#[track_caller]
fn assert_listed_backups_fetch(repo_args: &[OsString], cwd: &Path, store: &Scratch, after: &str) {
    for name in listed_names(repo_args, cwd) {
        let dir = store.mkdir(&format!("fetch-{name}"));
        let target = dir.join("data");
        let out = base_fetch(repo_args, cwd, &name, &target, &[]);
        assert_eq!(out.code, Some(0), "after {after}, listed backup {name} does not restore: {out:#?}");
        std::fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("remove {dir:?}: {e}"));
    }
}

/// No expiry mark is left and nothing of backup `name` is: no record, no object.
#[track_caller]
fn assert_gone(repo: &Repository, name: &str, after: &str) {
    let marks: Vec<String> = repo.keys_under("catalog/").into_iter().filter(|k| k.ends_with(".expiring")).collect();
    assert!(marks.is_empty(), "after {after}, expiry marks are left: {marks:?}");
    assert!(repo.keys_under(&format!("catalog/{name}.")).is_empty(), "after {after}, {name}'s record is left");
    let objects = repo.keys_under(&format!("backups/{name}/"));
    assert!(objects.is_empty(), "after {after}, objects of expired backup {name} are left: {objects:?}");
}

/// What the killed run left, step by step: the kill happened where the step says.
#[track_caller]
fn assert_killed_state(repo: &Repository, repo_args: &[OsString], cwd: &Path, step: &str, victim: &str, parts: usize) {
    let mark = format!("catalog/{victim}.expiring");
    let objects = repo.keys_under(&format!("backups/{victim}/"));
    let is_listed = listed_names(repo_args, cwd).contains(&victim.to_owned());
    let has_mark = repo.keys_under(&mark) == [mark.clone()];
    match step {
        "base-expire:marked" => {
            assert!(has_mark && is_listed && objects.len() == parts, "{step}: mark, record and parts: {objects:?}")
        }
        "base-expire:unlisted" => {
            assert!(has_mark && !is_listed && objects.len() == parts, "{step}: mark and parts, no record: {objects:?}")
        }
        "base-expire:parts" => {
            // The first page (every part here) went; the owner record goes last.
            let owner = format!("backups/{victim}/owner.json");
            assert!(has_mark && !is_listed && objects == [owner], "{step}: mark and owner record only: {objects:?}")
        }
        _ => assert_gone(repo, victim, step),
    }
}

fn a_kill_at_each_step_leaves_listed_backups_restorable_and_a_rerun_finishes(backend: Backend) {
    let label = backend.label();
    // Small parts: a backup is several objects, so a kill can fall between them.
    let lines = ConfigLines { tables: "[base]\npart_size = \"1MiB\"", ..ConfigLines::default() };
    let setup = ExpireSetup::new(backend, "kill", lines);
    let (store, repo, repo_args, cwd) = (&setup.store, &setup.repo, &setup.repo_args, setup.store.path());

    // --- Five backups, a batch of rows before each and one after the last. ---
    let cluster = primary(&format!("{label}-expire-kill"), repo);
    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    let mut backups = Vec::new();
    for batch in 1..=5 {
        insert_batch(&cluster, batch, ROWS_PER_BATCH);
        backups.push(base_push(&cluster, repo_args, cwd, &[]).0);
    }
    insert_batch(&cluster, 6, ROWS_PER_BATCH);
    archive_and_stop(cluster);
    assert_eq!(listed_names(repo_args, cwd), backups);

    // --- For each step, a run that has one backup to expire is killed there, then rerun. ---
    for (step, keep) in STEPS.iter().zip([4, 3, 2, 1]) {
        let keep_text = keep.to_string();
        let args = ["--keep", keep_text.as_str()];
        let victim = &backups[4 - keep];
        let parts = repo.keys_under(&format!("backups/{victim}/")).len();
        assert!(parts >= 3, "{victim} should be several objects (parts and owner record): {parts}");
        let wal_before: BTreeSet<String> = wal_from(&all_keys(repo), 0);
        killed_at(repo_args, cwd, step, &args);
        assert_listed_backups_fetch(repo_args, cwd, store, step);
        let wal_lost: BTreeSet<String> = &wal_before - &wal_from(&all_keys(repo), 0);
        assert!(wal_lost.is_empty(), "WAL goes after the backups, yet a kill at {step} lost {wal_lost:?}");
        assert_killed_state(repo, repo_args, cwd, step, victim, parts);

        let report = expire_json(repo_args, cwd, &args);
        let (expired, resumed) = (names_in(&report, "expired"), resumed_in(&report));
        match *step {
            "base-expire:marked" => assert_eq!((expired, resumed), (vec![victim.clone()], vec![]), "{report:#}"),
            "base-expire:wal" => assert_eq!((expired, resumed), (vec![], vec![]), "{report:#}"),
            _ => assert_eq!((expired, resumed), (vec![], vec![victim.clone()]), "resumed: {report:#}"),
        }
        assert!(report["wal_files"].as_u64().is_some_and(|n| n > 0), "the rerun deletes the WAL: {report:#}");
        assert_gone(repo, victim, &format!("the rerun after {step}"));
        assert_eq!(listed_names(repo_args, cwd), backups[5 - keep..], "after the rerun after {step}");
        // The oldest backup left is the one whose WAL lies next to what went: it recovers every row.
        let oldest = &backups[5 - keep];
        let sql = "select count(*) from t";
        let rows = restored_count(repo_args, cwd, &format!("{label}-expire-kill-r{keep}"), oldest, &[], sql);
        assert_eq!(rows, 6 * ROWS_PER_BATCH, "after the rerun after {step}, {oldest} recovers every row");
    }

    // --- Only the last backup is left, with the WAL from its start on (it recovered every row above). ---
    let from = start_segment(&record(repo_args, cwd, &backups[4]));
    let keys = all_keys(repo);
    let older_wal = &wal_from(&keys, 0) - &wal_from(&keys, from);
    assert!(older_wal.is_empty(), "WAL before the last backup's start is left: {older_wal:?}");
}

/// The name of the backup under way: its directory has an owner record and the catalog no record.
fn backup_under_way(repo: &Repository) -> Option<String> {
    repo.keys_under("backups/").into_iter().find_map(|key| {
        let name = key.strip_prefix("backups/")?.strip_suffix("/owner.json")?.to_owned();
        repo.keys_under(&format!("catalog/{name}.json")).is_empty().then_some(name)
    })
}

#[test]
fn a_backup_being_written_is_not_touched() {
    let lines = ConfigLines { tables: "[base]\npart_size = \"1MiB\"", ..ConfigLines::default() };
    let setup = ExpireSetup::new(Backend::Local, "writing", lines);
    let (store, repo, repo_args, cwd) = (&setup.store, &setup.repo, &setup.repo_args, setup.store.path());

    // --- Two complete backups (the older one is due), then a third being written, slowly. ---
    let cluster = primary("expire-writing", repo);
    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    for batch in 1..=2 {
        insert_batch(&cluster, batch, ROWS_PER_BATCH);
        base_push(&cluster, repo_args, cwd, &[]);
    }
    insert_batch(&cluster, 3, ROWS_PER_BATCH);
    let mut push = spawn(&mut base_push_command(&cluster, repo_args, cwd, &["--max-rate=4M"]));
    let mut writing = None;
    let started = push.wait_for(WAIT_TIMEOUT, || {
        writing = backup_under_way(repo);
        writing.is_some()
    });
    assert!(started, "base-push ended before its owner record was seen: {:#?}", finish(push, RUN_LIMIT).output);
    let writing = writing.expect("seen");
    let prefix = format!("backups/{writing}/");

    // --- base-expire --keep 1 while it uploads: the older complete backup goes, nothing of it. ---
    let (objects_before, wal_before) = (repo.keys_under(&prefix), all_keys(repo));
    let report = expire_json(repo_args, cwd, &["--keep", "1"]);
    assert!(!push.has_exited(), "base-push must still run after base-expire, or this shows nothing");
    assert_eq!(names_in(&report, "expired").len(), 1, "{report:#}");
    let objects_after = repo.keys_under(&prefix);
    let deleted: Vec<&String> = objects_before.iter().filter(|k| !objects_after.contains(k)).collect();
    assert!(deleted.is_empty(), "base-expire deleted objects of the backup being written: {deleted:?}");

    // --- The backup finishes, is listed, restores, and its WAL was all there all along. ---
    let pushed = finish(push, RUN_LIMIT).output;
    assert_eq!(pushed.code, Some(0), "the backup being written: {pushed:#?}");
    assert_eq!(pushed.stdout.trim(), writing);
    archive_and_stop(cluster);
    let from = start_segment(&record(repo_args, cwd, &writing));
    let lost: BTreeSet<String> = &wal_from(&wal_before, from) - &all_keys(repo);
    assert!(lost.is_empty(), "WAL from the backup's start was deleted: {lost:?}");
    let final_objects = repo.keys_under(&prefix);
    assert!(objects_before.iter().all(|k| final_objects.contains(k)), "parts of {writing} went missing");
    let dir = store.mkdir("fetch");
    let fetched = base_fetch(repo_args, cwd, &writing, &dir.join("data"), &[]);
    assert_eq!(fetched.code, Some(0), "base-fetch of the backup written during base-expire: {fetched:#?}");
}

#[test]
fn two_runs_at_once_end_as_one_and_runs_beside_archiving_lose_no_row() {
    let setup = ExpireSetup::new(Backend::Local, "concurrent", ConfigLines::default());
    let (repo, repo_args, cwd) = (&setup.repo, &setup.repo_args, setup.store.path());

    // --- Three backups, the archive complete and still (an idle server archives nothing). ---
    let cluster = primary("expire-concurrent", repo);
    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    for batch in 1..=3 {
        insert_batch(&cluster, batch, ROWS_PER_BATCH);
        base_push(&cluster, repo_args, cwd, &[]);
    }
    let last = cluster.switch_wal();
    cluster.wait_archived(&last, WAIT_TIMEOUT);

    // --- Two runs at once delete exactly what one run would. ---
    let before = all_keys(repo);
    let predicted = dry_run(repo_args, cwd, &["--keep", "1"]);
    assert!(predicted.iter().any(|k| k.starts_with("wal/")) && predicted.iter().any(|k| k.starts_with("backups/")));
    let runs = [0, 1].map(|_| spawn(&mut base_expire_command(repo_args, cwd, &["--keep", "1", "--json"])));
    for run in runs {
        let out = finish(run, RUN_LIMIT).output;
        assert_eq!(out.code, Some(0), "one of two runs at once: {out:#?}");
        report_of(&out);
    }
    let gone: BTreeSet<String> = before.difference(&all_keys(repo)).cloned().collect();
    assert_eq!(gone, predicted, "two runs at once deleted other than one run would");
    assert!(all_keys(repo).iter().all(|k| !k.ends_with(".expiring")), "an expiry mark is left");

    // --- Beside wal-push and base-push under load: runs while a new backup is written, and after. ---
    let mut load = spawn(&mut cluster.pgbench_command(&["-n", "-c", "2", "-j", "2", "-T", "10"]));
    let check = |when: &str| {
        let out = base_expire(repo_args, cwd, &["--keep", "1", "--json"]);
        assert_eq!(out.code, Some(0), "base-expire {when}, under load: {out:#?}");
        report_of(&out)
    };
    let mut push = spawn(&mut base_push_command(&cluster, repo_args, cwd, &[]));
    let mut runs_beside_push = 0;
    while !push.has_exited() {
        check("while base-push runs");
        runs_beside_push += 1;
    }
    assert!(runs_beside_push > 0, "no base-expire ran beside base-push");
    let pushed = finish(push, RUN_LIMIT).output;
    assert_eq!(pushed.code, Some(0), "base-push under load, beside base-expire: {pushed:#?}");
    let newest = pushed.stdout.trim().to_owned();
    walship_tests::backups::assert_backup_name(&newest);
    let report = check("after the new backup");
    assert_eq!(names_in(&report, "kept"), [newest.as_str()], "{report:#}");
    while !load.has_exited() {
        check("while the load goes on");
    }
    let loaded = finish(load, RUN_LIMIT).output;
    assert_eq!(loaded.code, Some(0), "pgbench: {loaded:#?}");
    let sql = "select count(*) from pgbench_history";
    let written: i64 = cluster.psql(sql).parse().expect("a count");
    assert!(written > 0, "pgbench wrote nothing");
    archive_and_stop(cluster);
    let rows = restored_count(repo_args, cwd, "expire-concurrent-r", &newest, &[], sql);
    assert_eq!(rows, written, "rows recovered from the kept backup after base-expire ran beside the load");
}

#[test]
fn bad_input_is_one_line_with_its_code_and_deletes_nothing() {
    let setup = ExpireSetup::new(Backend::Local, "bad", ConfigLines::default());
    let (store, repo, repo_args, cwd) = (&setup.store, &setup.repo, &setup.repo_args, setup.store.path());

    // --- Two backups: any run with a policy would delete the older one and WAL. ---
    let cluster = primary("expire-bad", repo);
    for batch in 1..=2 {
        insert_batch(&cluster, batch, ROWS_PER_BATCH);
        base_push(&cluster, repo_args, cwd, &[]);
    }
    archive_and_stop(cluster);
    assert!(!dry_run(repo_args, cwd, &["--keep", "1"]).is_empty(), "a --keep 1 would delete something");
    let before = repo.files_under("");

    let missing = "20200101T000000Z";
    let keep_for = &repo_args_of(&repo.write_config(
        store.path(),
        "keep-for.toml",
        ConfigLines { tables: "[retention]\nkeep_for = 3", ..ConfigLines::default() },
    ));
    let not_a_repo = store.mkdir("not-a-repository");
    let not_a_repo_args: Vec<OsString> = vec!["--repo".into(), not_a_repo.clone().into()];
    let refused = |what: &str, args: &[OsString], flags: &[&str], code: i32, needles: &[&str]| {
        let out = base_expire(args, cwd, flags);
        assert_error(&out, code, needles);
        assert_eq!(repo.files_under(""), before, "{what}: the repository changed");
    };
    refused("no policy at all", repo_args, &[], 2, &["--keep", "--keep-within", "[retention]"]);
    refused("--keep 0", repo_args, &["--keep", "0"], 2, &["--keep", "0"]);
    refused("--keep-within 5x", repo_args, &["--keep-within", "5x"], 2, &["--keep-within", "5x"]);
    refused("[retention] keep_for", keep_for, &[], 3, &["keep_for"]);
    refused("--pin of a backup that does not exist", repo_args, &["--pin", missing], 1, &[missing]);
    refused("--pin ../x", repo_args, &["--pin", "../x"], 2, &["../x"]);
    refused("not a repository", &not_a_repo_args, &["--keep", "1"], 6, &["not a walship repository"]);
    refused("--pin with --keep", repo_args, &["--pin", missing, "--keep", "1"], 2, &["--pin", "--keep"]);
    let stray = walship_tests::assertions::files_below(&not_a_repo);
    assert!(stray.is_empty(), "base-expire wrote into a directory that is not a repository: {stray:?}");
}
