//! base-verify against a real PostgreSQL 15, on all three repositories (local disk, S3 on s3s-fs,
//! SSH on a real sshd). Every run leaves the repository byte for byte as it was (every object's
//! size and SHA-256 compared before and after), and every restore test leaves no directory, no
//! server and no wal-fetch worker in its scratch directory.
//!
//! - `integrity_and_restore_tests`: a healthy backup passes the integrity check (exit 0, JSON and
//!   metrics read back); `--restore-test` reports each step's time, the RTO and the check query's
//!   output (the rows of the first consistent point; with `--to-end`, those of the end of the
//!   archive); a damaged part makes the integrity check exit 13 with a `damaged_part` finding
//!   naming its key; with the backup's WAL start segment removed, `--restore-test` exits 13 with the
//!   server's reason naming the segment.
//! - `killed_mid_replay`: replay is held (recovery_min_apply_delay on a commit after the backup) so
//!   that base-verify can be signalled while its server replays: SIGTERM stops the server and
//!   removes the directory (exit 11); `--timeout` ends the wait with a failed restore test; SIGKILL takes the server down with it (parent-death signal)
//!   and the next run removes the directory its predecessor left.

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use walship_tests::assertions::assert_error;
use walship_tests::backups::path_with_pg_bin;
use walship_tests::backups::{base_command, base_push, damage_middle};
use walship_tests::expire::{ExpireSetup, archive_and_stop, insert_batch, primary, record};
use walship_tests::pg::clear_pg_env;
use walship_tests::repository::{Backend, ConfigLines};
use walship_tests::running::{Running, finish, spawn};
use walship_tests::verify_base::{
    RestoreScratch, alive, assert_nothing_left, base_verify, base_verify_command, metrics_of, sample, scratch_dirs,
    scratch_postmaster, snapshot, verify_report,
};
use walship_tests::{Output, Scratch, isolate_environment, run};

walship_tests::every_backend!(integrity_and_restore_tests, killed_mid_replay);

/// A backup with a tablespace: the restore test restores the tablespace inside its scratch
/// directory, never where it lived (which still holds the live cluster's files), and leaves that
/// untouched. Local disk only: where the tablespace goes is not the backend's business.
#[test]
fn a_tablespace_is_restored_inside_the_scratch_directory() {
    let store = Scratch::new("bv-tablespace");
    let spool = store.mkdir("spool");
    let old_location = store.mkdir("tablespace");
    let tables = format!("[base]\nspool_dir = \"{}\"", spool.display());
    let repo = walship_tests::repository::Repository::local(&store);
    let config = repo.write_config(store.path(), "bv.toml", ConfigLines { tables: &tables, ..ConfigLines::default() });
    let repo_args: Vec<OsString> = vec!["--config".into(), config.into()];
    let cwd = store.path();
    let cluster = primary("bv-ts", &repo);
    cluster.psql(&format!("create tablespace extra location '{}'", old_location.display()));
    cluster.psql("create table far(n int) tablespace extra");
    cluster.psql("insert into far select g from generate_series(1, 5000) g");
    base_push(&cluster, &repo_args, cwd, &[]);
    archive_and_stop(cluster);
    let live_files = walship_tests::assertions::files_below(&old_location);
    let scratch_dir = RestoreScratch::create();
    let scratch = scratch_dir.path().to_owned();
    let check = ["--check-sql", "select count(*) from far", "--json"];
    let out =
        base_verify(&repo_args, cwd, &[&["--restore-test", "--scratch", path_arg(&scratch)][..], &check].concat());
    assert_eq!(out.code, Some(0), "{out:#?}");
    let tested = &verify_report(&out)["backups"][0]["restore_test"];
    assert_eq!(tested["check_output"], serde_json::json!(["5000"]), "{tested:#}");
    assert_eq!(walship_tests::assertions::files_below(&old_location), live_files, "the old location was touched");
    assert_nothing_left(&scratch, "a restore test with a tablespace");
}

const ROWS: i64 = 1000;
const STEPS: [&str; 5] = ["download_and_extract", "verify", "replay", "check", "stop_and_cleanup"];

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

fn integrity_and_restore_tests(backend: Backend) {
    let label = backend.label();
    let setup = ExpireSetup::new(backend, "bv", ConfigLines::default());
    let (repo, repo_args, cwd) = (&setup.repo, &setup.repo_args, setup.store.path());
    let cluster = primary(&format!("{label}-bv"), repo);
    insert_batch(&cluster, 1, ROWS);
    let metrics = cwd.join("base.prom");

    // --- A repository without a backup yet: a problem found (nothing can be restored), exit 13. ---
    wait_until(|| repo.keys_under("").iter().any(|k| k == "repository.json"), "wal-push wrote the identity record");
    let out = base_verify(repo_args, cwd, &["--json", "--metrics", path_arg(&metrics)]);
    assert_eq!(out.code, Some(13), "{out:#?}");
    let finding = &verify_report(&out)["findings"][0];
    assert_eq!(finding["kind"], "no_backups", "{finding:#}");
    assert!(out.stderr.contains("problem: no_backups"), "{}", out.stderr);
    let samples = metrics_of(&metrics);
    assert_eq!(sample(&samples, "walship_verify_completed", &[]), 1.0);
    assert_eq!(sample(&samples, "walship_verify_findings", &["kind=\"no_backups\""]), 1.0);
    assert_eq!(sample(&samples, "walship_backups", &[]), 0.0);

    let (name, _) = base_push(&cluster, repo_args, cwd, &[]);
    insert_batch(&cluster, 2, ROWS);
    archive_and_stop(cluster);
    let scratch_dir = RestoreScratch::create();
    let scratch = scratch_dir.path().to_owned();
    let before = snapshot(repo);

    let all = verify_report(&base_verify(repo_args, cwd, &["--all", "--json"]));
    assert_eq!((all["healthy"].as_bool(), all["backups"].as_array().map(Vec::len)), (Some(true), Some(1)), "{all:#}");
    // The catalog's figures, as the metrics carry them.
    let catalog = &all["catalog"];
    assert_eq!(catalog["backups"][0]["name"], *name, "{all:#}");
    assert_eq!(catalog["backups"][0]["stored_bytes"], all["backups"][0]["stored_bytes"], "{all:#}");
    assert!(catalog["newest_backup_age_seconds"].as_f64().is_some_and(|age| age >= 0.0), "{all:#}");

    // --- An unknown backup: exit 1, named. ---
    let out = base_verify(repo_args, cwd, &["20000101T000000Z"]);
    assert_error(&out, 1, &["no backup named 20000101T000000Z"]);

    // --- A healthy backup passes; the report and the metrics say so. ---
    let out = base_verify(repo_args, cwd, &["--json", "--metrics", path_arg(&metrics)]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    let report = verify_report(&out);
    assert_eq!(report["healthy"], true, "{report:#}");
    let backup = &report["backups"][0];
    assert_eq!((backup["name"].as_str(), backup["verified"].as_bool()), (Some(&*name), Some(true)), "{report:#}");
    assert_eq!(backup["restore_test"], serde_json::Value::Null);
    let catalog = record(repo_args, cwd, &name);
    assert_eq!(backup["stored_bytes"], catalog["stored_bytes"]);
    let samples = metrics_of(&metrics);
    let this = format!("backup=\"{name}\"");
    assert_eq!(sample(&samples, "walship_backups", &[]), 1.0);
    assert_eq!(sample(&samples, "walship_backup_verify_healthy", &[&this]), 1.0);
    assert_eq!(
        sample(&samples, "walship_backup_original_bytes", &[&this]),
        catalog["original_bytes"].as_f64().unwrap()
    );
    assert_eq!(sample(&samples, "walship_verify_healthy", &["command=\"base-verify\""]), 1.0);
    assert_eq!(sample(&samples, "walship_verify_findings", &["kind=\"damaged_part\""]), 0.0);
    // A healthy run whose metrics file cannot be written fails with the write's code.
    let unwritable = cwd.join("no-such-dir").join("base.prom");
    let out = base_verify(repo_args, cwd, &["--metrics", path_arg(&unwritable)]);
    assert_ends_in_error(&out, 9, &["write metrics"]);
    assert_eq!(snapshot(repo), before, "the integrity check changed the repository");

    // --- A restore test to the first consistent point: each step timed, the check's rows. ---
    // Run once recovery has ended: the server is promoted, no longer in recovery.
    let check = ["--check-sql", "select count(*) from t", "--check-sql", "select pg_is_in_recovery()"];
    let restore_test = ["--restore-test", "--json", "--scratch", path_arg(&scratch), "--metrics", path_arg(&metrics)];
    let out = base_verify(repo_args, cwd, &[&restore_test[..], &check].concat());
    assert_eq!(out.code, Some(0), "{out:#?}");
    let tested = &verify_report(&out)["backups"][0]["restore_test"];
    assert_eq!(tested["healthy"], true, "{tested:#}");
    let seconds = |step: &str| tested["steps"][step].as_f64().unwrap_or_else(|| panic!("{step} in {tested:#}"));
    for step in STEPS {
        assert!(seconds(step) >= 0.0, "{step}");
        assert!(out.stderr.contains(&format!("{step}: ")), "a line for {step}: {}", out.stderr);
    }
    let rto = tested["rto_seconds"].as_f64().expect("rto_seconds");
    let sum = seconds("download_and_extract") + seconds("verify") + seconds("replay");
    assert!(rto > 0.0 && (rto - sum).abs() < 0.01, "rto {rto} = {sum}: {tested:#}");
    assert_eq!(tested["check_output"], serde_json::json!([ROWS.to_string(), "f"]), "only the rows before the backup");
    let samples = metrics_of(&metrics);
    assert_eq!(sample(&samples, "walship_restore_test_healthy", &[&this]), 1.0);
    assert_eq!(sample(&samples, "walship_restore_test_rto_seconds", &[&this]), (rto * 1000.0).round() / 1000.0);
    assert_nothing_left(&scratch, "a restore test");

    // --- To the end of the archive: the rows inserted after the backup too. ---
    let out = base_verify(repo_args, cwd, &[&restore_test[..], &check, &["--to-end"]].concat());
    assert_eq!(out.code, Some(0), "{out:#?}");
    let tested = &verify_report(&out)["backups"][0]["restore_test"];
    assert_eq!(tested["check_output"], serde_json::json!([(2 * ROWS).to_string(), "f"]), "{tested:#}");
    assert_nothing_left(&scratch, "a restore test --to-end");
    assert_eq!(snapshot(repo), before, "the restore tests changed the repository");
    could_not_start(&setup, &scratch);
    tools_of_the_backups_version(&setup, &name);
    assert_eq!(snapshot(repo), before, "the failed starts changed the repository");

    // --- A catalog record that disagrees with the stored manifest: exit 13, manifest_mismatch. ---
    let record_file = repo.object_file(&format!("catalog/{name}.json"));
    let record_bytes = fs::read(&record_file).unwrap();
    let mut edited: serde_json::Value = serde_json::from_slice(&record_bytes).unwrap();
    edited["stop_lsn"] = "0/FFFFFF".into();
    fs::write(&record_file, serde_json::to_vec_pretty(&edited).unwrap()).unwrap();
    let out = base_verify(repo_args, cwd, &["--json"]);
    assert_eq!(out.code, Some(13), "{out:#?}");
    let finding = &verify_report(&out)["findings"][0];
    assert_eq!(finding["kind"], "manifest_mismatch", "{finding:#}");
    assert!(finding["message"].as_str().unwrap().contains("0/FFFFFF"), "{finding:#}");
    // The restore test checks the files against the manifest, not the manifest against the catalog:
    // base-verify does that beside it.
    let out = base_verify(repo_args, cwd, &restore_test);
    assert_eq!(out.code, Some(13), "{out:#?}");
    let report = verify_report(&out);
    assert_eq!(report["findings"][0]["kind"], "manifest_mismatch", "{report:#}");
    assert_eq!(report["backups"][0]["verified"], false, "{report:#}");
    assert_nothing_left(&scratch, "a restore test of a backup whose manifest disagrees");
    fs::write(&record_file, &record_bytes).unwrap();

    // --- A damaged part: exit 13, the part's key named. ---
    let key = format!("backups/{name}/base.tar.000001");
    let part = repo.object_file(&key);
    let original = damage_middle(&part);
    let damaged = snapshot(repo);
    let out = base_verify(repo_args, cwd, &["--json"]);
    assert_eq!(out.code, Some(13), "{out:#?}");
    let report = verify_report(&out);
    assert_eq!(report["healthy"], false);
    let finding = &report["findings"][0];
    assert_eq!(
        (finding["kind"].as_str(), finding["subject"].as_str()),
        (Some("damaged_part"), Some(&*key)),
        "{report:#}"
    );
    assert_eq!(report["findings"].as_array().unwrap().len(), 1, "{report:#}");
    assert_eq!(report["backups"][0]["verified"], false);
    assert!(out.stderr.contains("problem: damaged_part") && out.stderr.contains(&key), "{}", out.stderr);
    assert_eq!(snapshot(repo), damaged, "the integrity check changed the repository");
    fs::write(&part, &original).unwrap();

    // --- The backup's WAL start segment removed: the restore test fails with the cause. ---
    let start = catalog["start_wal_file"].as_str().expect("start_wal_file").to_owned();
    let segment = repo
        .keys_under("wal/")
        .into_iter()
        .find(|k| k.rsplit('/').next().is_some_and(|file| file.starts_with(&start)))
        .unwrap_or_else(|| panic!("{start} in the repository"));
    fs::remove_file(repo.object_file(&segment)).unwrap();
    let without = snapshot(repo);
    let out = base_verify(repo_args, cwd, &restore_test);
    assert_eq!(out.code, Some(13), "{out:#?}");
    let report = verify_report(&out);
    let finding = &report["findings"][0];
    assert_eq!(finding["kind"], "restore_test_failed", "{report:#}");
    let message = finding["message"].as_str().unwrap();
    assert!(message.contains(&start) && message.contains("FATAL"), "the cause: {message}");
    assert_eq!(report["backups"][0]["restore_test"]["healthy"], false);
    assert_nothing_left(&scratch, "a failed restore test");
    assert_eq!(snapshot(repo), without, "the failed restore test changed the repository");
}

/// A restore test that could not check: exit `code`, nothing on stdout, and its last line the one
/// error line, with every needle (the lines before it are the steps it logged).
#[track_caller]
fn assert_ends_in_error(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.code, Some(code), "{out:#?}");
    assert!(out.stdout.is_empty(), "{out:#?}");
    let last = out.stderr.lines().last().unwrap_or_default();
    let program = ["base-verify: error: ", "base-fetch: error: "].iter().any(|p| last.starts_with(p));
    assert!(program && last.ends_with(&format!("(exit {code})")), "{out:#?}");
    for needle in needles {
        assert!(last.contains(needle), "the error line should mention {needle:?}: {last}");
    }
}

#[track_caller]
fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory holding fake PostgreSQL `tools` that say they are version `version`, and PATH with it
/// first.
fn fake_tools(tools: &[&str], version: &str) -> (Scratch, OsString) {
    let fake = Scratch::new("bv-fake-tools");
    for tool in tools {
        let path = fake.path().join(tool);
        fs::write(
            &path,
            format!("#!/bin/sh\n[ \"$1\" = --version ] && echo '{tool} (PostgreSQL) {version}' && exit 0\nexit 1\n"),
        )
        .unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let mut path = vec![fake.path().to_owned()];
    path.extend(std::env::split_paths(&path_with_pg_bin()));
    (fake, std::env::join_paths(path).unwrap())
}

/// The programs that judge or start a backup are chosen by its major version, not by PATH order: a
/// PostgreSQL 18 pg_verifybackup (or 14 postgres) first on PATH is passed over for 15's; where only
/// another version is to be had (pg_bin_dir), the refusal names it (exit 10) before anything is
/// downloaded, and is never reported as a corrupt backup.
fn tools_of_the_backups_version(setup: &ExpireSetup, name: &str) {
    let (repo_args, cwd) = (&setup.repo_args, setup.store.path());
    let (fake, path) = fake_tools(&["pg_verifybackup", "postgres"], "18.6");
    let restored = cwd.join("restored-by-version");
    let out = run(base_command("base-fetch", repo_args, cwd).env("PATH", &path).arg(name).arg(&restored));
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains("backup successfully verified"), "15's pg_verifybackup ran: {}", out.stderr);
    fs::remove_dir_all(&restored).unwrap();
    let config = setup.repo.write_config(
        cwd,
        "fake-bin.toml",
        ConfigLines { top: &format!("pg_bin_dir = {:?}", fake.path()), ..ConfigLines::default() },
    );
    let config_args = [OsString::from("--config"), config.into()];
    let out = run(base_command("base-fetch", &config_args, cwd).arg(name).arg(&restored));
    assert_ends_in_error(&out, 10, &["pg_verifybackup", "the backup is PostgreSQL 15", "(PostgreSQL) 18.6"]);
    assert!(!out.stderr.contains("corrupt") && !out.stderr.contains("restoring backup"), "{}", out.stderr);
    assert!(fs::read_dir(&restored).map_or(true, |mut d| d.next().is_none()), "nothing left in {restored:?}");
}

/// Restore tests that cannot start a server say why in one line, as "could not check" (exit 10),
/// and leave nothing: only a `postgres` of another major version (pg_bin_dir; refused before
/// anything is downloaded), and base-verify run as root (PostgreSQL refuses to start). A postgres of
/// another version first on PATH is passed over for the backup's own.
fn could_not_start(setup: &ExpireSetup, scratch: &Path) {
    let (repo_args, cwd) = (&setup.repo_args[..], setup.store.path());
    let scratch_arg = ["--restore-test", "--scratch", path_arg(scratch)];
    let (fake, path) = fake_tools(&["postgres"], "14.9");
    let out = run(base_verify_command(repo_args, cwd, &scratch_arg).env("PATH", &path));
    assert_eq!(out.code, Some(0), "15's postgres, not 14's first on PATH: {out:#?}");
    assert_nothing_left(scratch, "a restore test with another postgres first on PATH");
    let config = setup.repo.write_config(
        cwd,
        "fake-postgres.toml",
        ConfigLines { top: &format!("pg_bin_dir = {:?}", fake.path()), ..ConfigLines::default() },
    );
    let config_args = [OsString::from("--config"), config.into()];
    let out = run(&mut base_verify_command(&config_args, cwd, &scratch_arg));
    assert_ends_in_error(&out, 10, &["the backup is PostgreSQL 15", "(PostgreSQL) 14.9"]);
    assert!(!out.stderr.contains("download_and_extract"), "refused before the download: {}", out.stderr);
    assert_nothing_left(scratch, "a restore test with only the wrong postgres");
    if walship_tests::server_user().is_some() {
        let mut as_root = Command::new(walship_tests::bin("base-verify"));
        isolate_environment(&mut as_root);
        clear_pg_env(&mut as_root).env("PATH", path_with_pg_bin()).current_dir(cwd).args(repo_args).args(scratch_arg);
        let out = run(&mut as_root);
        assert_ends_in_error(&out, 10, &["before accepting connections", "root"]);
        assert_nothing_left(scratch, "a restore test run as root");
    }
}

/// Waits until the restore test's server under `scratch` is consistent and replaying (a hot standby
/// is "ready" while recovery.signal is still there), the moment to signal base-verify; returns the postmaster's pid and
/// base-verify, or fails with what base-verify said if it exited first.
#[track_caller]
fn wait_replaying(scratch: &Path, mut running: Running) -> (i32, Running) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        if let Some((pid, status, in_recovery)) = scratch_postmaster(scratch)
            && status == "ready"
            && in_recovery
        {
            return (pid, running);
        }
        if running.has_exited() {
            let out = finish(running, Duration::from_secs(1)).output;
            panic!("base-verify exited before its server replayed: {out:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the restore test's server never came to replay");
}

fn killed_mid_replay(backend: Backend) {
    let label = backend.label();
    let setup = ExpireSetup::new(backend, "bv-kill", ConfigLines::default());
    let (repo, repo_args, cwd) = (&setup.repo, &setup.repo_args, setup.store.path());
    let cluster = primary(&format!("{label}-bv-kill"), repo);
    // Carried into the backup's postgresql.auto.conf: replay to the end holds an hour at the first
    // commit after the consistent point (none is delayed before it).
    cluster.psql("alter system set recovery_min_apply_delay = '1h'");
    cluster.psql("select pg_reload_conf()");
    insert_batch(&cluster, 1, ROWS);
    base_push(&cluster, repo_args, cwd, &[]);
    insert_batch(&cluster, 2, ROWS);
    archive_and_stop(cluster);
    let scratch_dir = RestoreScratch::create();
    let scratch = scratch_dir.path().to_owned();
    let before = snapshot(repo);
    let args: Vec<OsString> =
        ["--restore-test", "--to-end", "--scratch", path_arg(&scratch)].map(OsString::from).into();
    let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();

    // --- SIGTERM mid-replay: the server stopped, the directory removed, exit 11. ---
    let (_, running) = wait_replaying(&scratch, spawn(&mut base_verify_command(repo_args, cwd, &args)));
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(running.id() as i32, libc::SIGTERM) };
    let out = finish(running, Duration::from_secs(120)).output;
    assert_eq!(out.code, Some(11), "{out:#?}");
    assert!(out.stderr.contains("SIGTERM"), "{}", out.stderr);
    assert_nothing_left(&scratch, "base-verify stopped by SIGTERM");

    // --- Replay held past --timeout: a failed restore test (exit 13), nothing left. ---
    let out = base_verify(repo_args, cwd, &[&args[..], &["--timeout", "2s", "--json"]].concat());
    assert_eq!(out.code, Some(13), "{out:#?}");
    let finding = &verify_report(&out)["findings"][0];
    assert_eq!(finding["kind"], "restore_test_failed", "{finding:#}");
    assert!(finding["message"].as_str().unwrap().contains("within 2 s (--timeout)"), "{finding:#}");
    assert_nothing_left(&scratch, "a restore test past its timeout");

    // --- SIGKILL mid-replay: the server goes down with base-verify; the next run cleans up. ---
    let (postmaster, running) = wait_replaying(&scratch, spawn(&mut base_verify_command(repo_args, cwd, &args)));
    running.kill();
    let started = Instant::now();
    while alive(postmaster) && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(postmaster), "the server outlived base-verify's SIGKILL");
    let left = scratch_dirs(&scratch);
    assert_eq!(left.len(), 1, "a killed run leaves its directory: {left:?}");
    let out = base_verify(repo_args, cwd, &["--restore-test", "--scratch", path_arg(&scratch)]);
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stderr.contains(&format!("removed {}", left[0].display())), "{}", out.stderr);
    assert_nothing_left(&scratch, "the run after a SIGKILL");
    assert_eq!(snapshot(repo), before, "the restore tests changed the repository");
}
