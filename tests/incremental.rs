//! Incremental base backups on PostgreSQL 18 (and 17, and what 16 says): `base-push --incremental`
//! takes a chain of a full backup and incremental ones under pgbench load, base-list shows each
//! one's type and parent, and `base-fetch` restores each of them to a target time after it, the
//! incremental ones by combining their chain with pg_combinebackup, with rows counted exactly. The
//! chain scenario runs on PostgreSQL 18 on local disk, S3 and SSH, and on PostgreSQL 17 (its own
//! programs) on local disk; 18's pg_combinebackup is refused for a 17 chain (exit 10).
//!
//! Then the guards: `--from NAME`; a parent of another cluster (exit 6); no pg_combinebackup of the
//! backup's version (exit 10, before anything is downloaded); a damaged part of the middle link
//! (exit 7) and a SIGTERM while the chain is combined (exit 11), both leaving nothing startable and
//! no scratch space; a server without WAL summaries, an empty catalog and a PostgreSQL 16 server
//! (one-line errors, or a full backup with `--full-if-needed`); base-verify's restore test of an
//! incremental backup.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use walship_tests::assertions::assert_absent;
use walship_tests::backups::{
    assert_backup_name, base_command_in, base_fetch_in, chain_scratch_in, damage_middle, listed_records_in,
};
use walship_tests::pg::{Cluster, WAIT_TIMEOUT};
use walship_tests::repository::{Backend, ConfigLines, Repository};
use walship_tests::running::{finish, spawn};
use walship_tests::verify_base::{RestoreScratch, alive, assert_nothing_left, base_verify_command};
use walship_tests::versions::PgInstall;
use walship_tests::{Output, Scratch, run, wait_until};

/// The settings an incremental backup needs on the server, beside archiving.
const SUMMARIZING: [(&str, &str); 2] = [
    ("summarize_wal", "on"),
    // pg_basebackup -X fetch collects the backup's WAL at its end: a checkpoint under load must not
    // have recycled it by then.
    ("wal_keep_size", "256MB"),
];

/// base-push with walship `flags` (before `--`) against `cluster`, with `install`'s programs first on
/// PATH, not yet run.
fn push_command(install: &PgInstall, cluster: &Cluster, repo_args: &[OsString], cwd: &Path, flags: &[&str]) -> Command {
    let mut cmd = base_command_in(install, "base-push", repo_args, cwd);
    cmd.args(flags);
    cluster.libpq_env(&mut cmd).args(["--", "--checkpoint=fast"]);
    cmd
}

/// Runs base-push with `flags` and returns the backup's name and its output; panics unless it
/// succeeded.
#[track_caller]
fn push(cluster: &Cluster, repo_args: &[OsString], cwd: &Path, flags: &[&str]) -> (String, Output) {
    let out = run(&mut push_command(cluster.install(), cluster, repo_args, cwd, flags));
    assert_eq!(out.code, Some(0), "base-push {flags:?} failed: {out:#?}");
    let name = out.stdout.trim().to_owned();
    assert_backup_name(&name);
    (name, out)
}

/// A failed command: `code`, nothing on stdout, and stderr ending in its one error line, naming the
/// exit code and containing every needle (log lines of what it did may come before it).
#[track_caller]
fn assert_failed(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.code, Some(code), "exit code; output: {out:#?}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:#?}");
    let errors: Vec<&str> = out.stderr.lines().filter(|line| line.contains(": error: ")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line: {:?}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert_eq!(errors[0], last, "the error line comes last: {:?}", out.stderr);
    assert!(last.ends_with(&format!("(exit {code})")), "error line {last:?} names its exit code");
    for needle in needles {
        assert!(last.contains(needle), "the error should mention {needle:?}: {last:?}");
    }
}

/// Every value a restore is checked against.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    history_rows: i64,
    balance_sum: i64,
    marker_rows: i64,
}

fn snapshot(cluster: &Cluster) -> Snapshot {
    Snapshot {
        history_rows: cluster.count("select count(*) from pgbench_history"),
        balance_sum: cluster.count("select sum(abalance) from pgbench_accounts"),
        marker_rows: cluster.count("select count(*) from marker"),
    }
}

/// A new PostgreSQL 18 cluster archiving into `repo`, with WAL summaries on (unless `summaries` is
/// false), pgbench's tables at `scale` and an empty `marker` table.
fn cluster_in(install: &PgInstall, name: &str, repo: &Repository, summaries: bool, scale: &str) -> Cluster {
    let settings: &[(&str, &str)] = if summaries { &SUMMARIZING } else { &SUMMARIZING[1..] };
    let cluster = Cluster::start_archiving_in(install, name, &repo.archive_command(), settings);
    cluster.pgbench(&["-i", "-s", scale, "-q"]);
    cluster.psql("create table marker(batch text, n int)");
    let segment = cluster.switch_wal();
    cluster.wait_archived(&segment, WAIT_TIMEOUT);
    cluster
}

/// Writes that change every value of a [`Snapshot`].
fn write_batch(cluster: &Cluster, batch: &str, rows: u32) {
    cluster.psql(&format!("insert into marker select '{batch}', g from generate_series(1, {rows}) g"));
    cluster.psql(&format!("update pgbench_accounts set abalance = abalance + {rows} where aid <= 300"));
    cluster.psql("insert into pgbench_history(tid, bid, aid, delta, mtime) values (1, 1, 1, 1, now())");
}

fn sleep_past_clock_tick() {
    std::thread::sleep(Duration::from_millis(1100));
}

/// Takes a backup with `flags` while pgbench writes, then stops the load.
fn push_under_load(cluster: &Cluster, repo_args: &[OsString], cwd: &Path, flags: &[&str]) -> String {
    let load = spawn(&mut cluster.pgbench_command(&["-n", "-c", "2", "-j", "2", "-T", "600"]));
    let before = cluster.count("select count(*) from pgbench_history");
    wait_until("pgbench is writing", || {
        (cluster.count("select count(*) from pgbench_history") > before + 50).then_some(())
    });
    let (name, _) = push(cluster, repo_args, cwd, flags);
    let during = cluster.count("select count(*) from pgbench_history");
    assert!(during > before + 50, "pgbench wrote while base-push ran");
    load.kill();
    wait_until("pgbench's backends are gone", || {
        (cluster.count("select count(*) from pg_stat_activity where application_name = 'pgbench'") == 0).then_some(())
    });
    name
}

/// Archives what `cluster` wrote, then crashes it.
fn lose(mut cluster: Cluster) {
    // A write of its own: a switch out of a segment that holds nothing new would not happen.
    cluster.psql("create table lost(n int); insert into lost values (1)");
    let last = cluster.switch_wal();
    cluster.wait_archived(&last, WAIT_TIMEOUT);
    cluster.crash();
}

/// Restores `name` (or LATEST) with `extra` into a new cluster of `install`, starts it and returns
/// it with base-fetch's output; panics unless the restore and the recovery succeeded.
#[track_caller]
fn restore(
    install: &PgInstall,
    repo_args: &[OsString],
    cwd: &Path,
    label: &str,
    name: &str,
    extra: &[&str],
) -> (Cluster, Output) {
    let mut restored = Cluster::without_data_dir_in(install, label);
    let out = base_fetch_in(install, repo_args, cwd, name, restored.data_dir(), extra);
    assert_eq!(out.code, Some(0), "base-fetch {name} {extra:?} failed: {out:#?}");
    let parent = restored.data_dir().parent().unwrap().to_owned();
    assert_eq!(chain_scratch_in(&parent), Vec::<String>::new(), "scratch space left beside the restore");
    restored.adopt_data_dir();
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    (restored, out)
}

walship_tests::every_backend!(chain_under_load_restored_to_each_target);

/// A full backup and two incremental ones, each under pgbench load; each restored to a target time
/// after it, the incremental ones through their chains. On PostgreSQL 18 on every backend.
fn chain_under_load_restored_to_each_target(backend: Backend) {
    chain_under_load(backend, 18);
}

/// The same chain on PostgreSQL 17 (its own pg_basebackup, pg_combinebackup and pg_verifybackup),
/// on local disk: the backends are the 18 run's business, the version is this one's.
#[test]
fn postgresql_17_chain_under_load_restored_to_each_target() {
    chain_under_load(Backend::Local, 17);
}

fn chain_under_load(backend: Backend, major: u32) {
    let label = format!("{}-pg{major}", backend.label());
    let install = PgInstall::of(major);
    assert!(install.has_own("pg_combinebackup"), "the pinned PostgreSQL {major} build is complete");
    let store = &Scratch::new(&format!("inc-{label}"));
    let repo = &Repository::new(backend, store);
    let tables = "[base]\npart_size = \"1MiB\"\ntransfer_concurrency = 3";
    let config = repo.write_config(store.path(), "inc.toml", ConfigLines { tables, ..ConfigLines::default() });
    let repo_args: Vec<OsString> = vec!["--config".into(), config.into()];
    let cwd = store.path();
    let primary = cluster_in(&install, &format!("{label}-inc-primary"), repo, true, "2");

    let mut steps = Vec::new();
    for (step, flags) in [("full", &[][..]), ("first", &["--incremental"][..]), ("second", &["--incremental"][..])] {
        let name = push_under_load(&primary, &repo_args, cwd, flags);
        write_batch(&primary, step, 100 * (steps.len() as u32 + 1));
        let at_target = snapshot(&primary);
        sleep_past_clock_tick();
        let target = primary.psql("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'");
        sleep_past_clock_tick();
        steps.push((name, target, at_target));
    }
    write_batch(&primary, "after", 1000);
    let at_end = snapshot(&primary);
    lose(primary);

    // --- base-list: each backup's type and parent, in the table and in --json. ---
    let names: Vec<&str> = steps.iter().map(|(name, _, _)| name.as_str()).collect();
    let records = listed_records_in(&install, &repo_args, cwd);
    let listed: Vec<(&str, &str, Option<&str>)> = records
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["backup_type"].as_str().unwrap(), r["parent"].as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            (names[0], "full", None),
            (names[1], "incremental", Some(names[0])),
            (names[2], "incremental", Some(names[1]))
        ],
        "{records:#?}"
    );
    assert!(records[0]["parent"].is_null(), "a full backup's parent is null in --json: {:#}", records[0]);
    assert_eq!(records[1]["format_version"], 2, "an incremental record is format 2: {:#}", records[1]);
    let manifest_arg = format!("--incremental=backups/{}/backup_manifest", names[0]);
    let arguments = records[1]["pg_basebackup"]["arguments"].as_array().unwrap();
    assert!(arguments.iter().any(|a| *a == manifest_arg.as_str()), "the parent's manifest by its key: {arguments:?}");
    let (full_bytes, first_bytes) = (records[0]["original_bytes"].as_u64(), records[1]["original_bytes"].as_u64());
    assert!(
        first_bytes < full_bytes,
        "an incremental backup copies less than a full one: {first_bytes:?} {full_bytes:?}"
    );
    let table = run(&mut base_command_in(&install, "base-list", &repo_args, cwd));
    let rows: Vec<Vec<&str>> = table.stdout.lines().map(|l| l.split_whitespace().collect()).collect();
    // The columns come last but for PINNED (sizes are two words, "55.6 MiB").
    let last_two = |row: usize| rows[row][rows[row].len() - 2..].to_vec();
    assert_eq!(rows[0][rows[0].len() - 3..], ["TYPE", "PARENT", "PINNED"], "{}", table.stdout);
    assert_eq!(last_two(1), ["full", "-"], "{}", table.stdout);
    assert_eq!(last_two(3), ["incremental", names[1]], "{}", table.stdout);

    // --- Each backup restored to its target: LATEST picks it, its chain is combined. ---
    for (index, (name, target, at_target)) in steps.iter().enumerate() {
        let (restored, out) =
            restore(&install, &repo_args, cwd, &format!("{label}-inc-{index}"), "LATEST", &["--target-time", target]);
        assert_eq!(out.stdout, format!("{name}\n"), "LATEST before {target} is {name}: {out:#?}");
        let combined = format!("combined a chain of {} backups, from {}", index + 1, names[0]);
        assert_eq!(out.stderr.contains(&combined), index > 0, "base-fetch's log: {}", out.stderr);
        assert!(out.stderr.contains("backup successfully verified"), "pg_verifybackup ran: {}", out.stderr);
        assert_eq!(&snapshot(&restored), at_target, "backup {index} at its target (at the end: {at_end:?})");
        let log = restored.log_contents();
        assert!(log.contains("recovery stopping before commit"), "stopped at the target\n{}", restored.log_tail());
    }
}

/// A directory of wrappers for `pg_bin_dir`: each `(name, script body)` an executable shell script.
fn tool_dir(store: &Scratch, name: &str, tools: &[(&str, String)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = store.mkdir(name);
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    for (tool, body) in tools {
        let path = dir.join(tool);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// A configuration of `repo` with `pg_bin_dir = dir`.
fn config_with_bin(store: &Scratch, repo: &Repository, file: &str, dir: &Path) -> Vec<OsString> {
    let top = format!("pg_bin_dir = \"{}\"", dir.display());
    let config = repo.write_config(store.path(), file, ConfigLines { top: &top, ..ConfigLines::default() });
    vec!["--config".into(), config.into()]
}

/// `--from`, a parent of another cluster, a missing pg_combinebackup, a damaged middle link, a
/// SIGTERM while combining, and base-verify's restore test of an incremental backup.
#[test]
fn chain_guards() {
    let install = PgInstall::of(18);
    let store = &Scratch::new("inc-guards");
    let repo = &Repository::local(store);
    let repo_args = repo.cli_args();
    let cwd = store.path();
    let cluster = cluster_in(&install, "inc-guards", repo, true, "1");
    let (full, _) = push(&cluster, &repo_args, cwd, &[]);
    write_batch(&cluster, "a", 100);
    let (first, out) = push(&cluster, &repo_args, cwd, &["--incremental"]);
    assert!(out.stderr.contains(&format!("incremental on top of {full}")), "{}", out.stderr);
    write_batch(&cluster, "b", 200);
    let (second, _) = push(&cluster, &repo_args, cwd, &["--incremental"]);
    write_batch(&cluster, "c", 300);
    let at_third = snapshot(&cluster);
    let (third, _) = push(&cluster, &repo_args, cwd, &["--incremental", "--from", &full]);
    let parents: Vec<(String, Option<String>)> = listed_records_in(&install, &repo_args, cwd)
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_owned(), r["parent"].as_str().map(str::to_owned)))
        .collect();
    let expected = [(&full, None), (&first, Some(&full)), (&second, Some(&first)), (&third, Some(&full))];
    let expected: Vec<(String, Option<String>)> = expected.iter().map(|(n, p)| (n.to_string(), p.cloned())).collect();
    assert_eq!(parents, expected, "--from names the parent");
    assert_eq!(repo.keys_under("catalog/").len(), 4, "no claim left behind: {:?}", repo.keys_under("catalog/"));

    // --- A parent of another cluster: the server refuses its manifest. ---
    let other = cluster_in(&install, "inc-other", &Repository::local(&Scratch::new("inc-other")), true, "1");
    let out = run(&mut push_command(&install, &other, &repo_args, cwd, &["--incremental", "--from", &full]));
    assert_failed(&out, 6, &["another cluster", &full]);
    assert_eq!(
        repo.keys_under("catalog/").len(),
        4,
        "nothing left of the refused backup: {:?}",
        repo.keys_under("catalog/")
    );
    drop(other);

    // --- base-verify's restore test goes through the chain. ---
    let scratch = RestoreScratch::create();
    let mut verify = base_verify_command(
        &repo_args,
        cwd,
        &["--restore-test", "--scratch", scratch.path().to_str().unwrap(), &second],
    );
    let out = run(verify.env("PATH", install.path()));
    assert_eq!(out.code, Some(0), "base-verify --restore-test of an incremental backup: {out:#?}");
    assert_nothing_left(scratch.path(), "base-verify's restore test of an incremental backup");

    // --- No pg_combinebackup of the backup's version: exit 10, before anything is downloaded. ---
    let verifier = format!("exec {} \"$@\"", install.program("pg_verifybackup").display());
    let lacking = tool_dir(store, "no-combine", &[("pg_verifybackup", verifier.clone())]);
    let lacking_args = config_with_bin(store, repo, "no-combine.toml", &lacking);
    let target = store.path().join("restored");
    let out = base_fetch_in(&install, &lacking_args, cwd, &second, &target, &[]);
    assert_failed(&out, 10, &["pg_combinebackup", "not found", "PostgreSQL 18"]);
    assert_absent(&target);
    assert_eq!(chain_scratch_in(store.path()), Vec::<String>::new());

    // --- SIGTERM while the chain is combined: exit 11, nothing left. ---
    let real = install.program("pg_combinebackup");
    let pid_file = store.path().join("combine.pid");
    let hanging = format!(
        "case \"$1\" in --version) exec {} --version;; esac\necho $$ > {}\nexec sleep 120",
        real.display(),
        pid_file.display()
    );
    let slow = tool_dir(store, "slow-combine", &[("pg_verifybackup", verifier), ("pg_combinebackup", hanging)]);
    let slow_args = config_with_bin(store, repo, "slow-combine.toml", &slow);
    let mut fetch = spawn(base_command_in(&install, "base-fetch", &slow_args, cwd).arg(&second).arg(&target));
    let pid_file_written =
        fetch.wait_for(WAIT_TIMEOUT, || fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n')));
    assert!(pid_file_written, "base-fetch never ran pg_combinebackup");
    let combiner: i32 = fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(target.join(".walship-restore").is_dir(), "combining into DATA_DIR's staging directory");
    assert!(!target.join("global/pg_control").exists(), "nothing startable while combining");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(fetch.id() as i32, libc::SIGTERM) };
    let out = finish(fetch, WAIT_TIMEOUT).output;
    assert_failed(&out, 11, &["interrupted by SIGTERM"]);
    assert_absent(&target);
    assert_eq!(chain_scratch_in(store.path()), Vec::<String>::new(), "scratch removed after SIGTERM");
    assert!(!alive(combiner), "pg_combinebackup stopped with base-fetch");
    fs::remove_file(&pid_file).unwrap();

    // --- SIGTERM while the links are downloaded and extracted (pg_combinebackup never reached). ---
    let mut fetch = spawn(base_command_in(&install, "base-fetch", &slow_args, cwd).arg(&second).arg(&target));
    let started = fetch.wait_for(WAIT_TIMEOUT, || !chain_scratch_in(store.path()).is_empty());
    assert!(started, "base-fetch never made its scratch space");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(fetch.id() as i32, libc::SIGTERM) };
    let out = finish(fetch, WAIT_TIMEOUT).output;
    assert_failed(&out, 11, &["interrupted by SIGTERM"]);
    assert!(!pid_file.exists(), "stopped before pg_combinebackup ran");
    assert_absent(&target);
    assert_eq!(chain_scratch_in(store.path()), Vec::<String>::new(), "scratch removed after SIGTERM");

    // --- A damaged part of the middle link: exit 7, nothing startable, no scratch. ---
    let part = repo.object_file(&format!("backups/{first}/base.tar.000001"));
    let original = damage_middle(&part);
    let out = base_fetch_in(&install, &repo_args, cwd, &second, &target, &[]);
    assert_failed(&out, 7, &[&format!("backups/{first}/base.tar.000001")]);
    assert_absent(&target);
    assert_eq!(chain_scratch_in(store.path()), Vec::<String>::new(), "scratch removed after a damaged link");
    fs::write(&part, original).unwrap();

    // --- Killed after each step of a chain restore: pg_control never in place. ---
    for step in ["chain-restored", "combined", "extracted", "configured", "verified"] {
        let abort = format!("base-fetch:{step}:abort");
        let out = run(base_command_in(&install, "base-fetch", &repo_args, cwd)
            .env(walship::failpoint::FAILPOINT_VAR, &abort)
            .arg(&second)
            .arg(&target));
        assert_eq!(out.code, None, "base-fetch aborted after {step}: {out:#?}");
        assert!(target.is_dir(), "after {step}: the restore was cut short, not undone");
        assert!(!target.join("global/pg_control").exists(), "after {step}: pg_control is not in place");
        let moved = !matches!(step, "chain-restored" | "combined");
        assert_eq!(target.join("global/pg_control.walship-incomplete").is_file(), moved, "after {step}: held back");
        fs::remove_dir_all(&target).unwrap();
        for left in chain_scratch_in(store.path()) {
            fs::remove_dir_all(store.path().join(left)).unwrap();
        }
    }

    // --- A parent being expired is never picked, nor taken with --from. ---
    let mark = repo.object_file(&format!("catalog/{third}.expiring"));
    fs::write(&mark, "{}").unwrap();
    let (fourth, out) = push(&cluster, &repo_args, cwd, &["--incremental"]);
    assert!(
        out.stderr.contains(&format!("incremental on top of {second}")),
        "not on the expiring {third}: {}",
        out.stderr
    );
    let out = run(&mut push_command(&install, &cluster, &repo_args, cwd, &["--incremental", "--from", &third]));
    assert_failed(&out, 1, &[&third, "being removed by base-expire"]);
    fs::remove_file(&mark).unwrap();

    // --- A stored manifest that is not the one the parent's record names: refused (exit 7). ---
    let manifest = repo.object_file(&format!("backups/{full}/backup_manifest"));
    let original = fs::read(&manifest).unwrap();
    fs::copy(repo.object_file(&format!("backups/{first}/backup_manifest")), &manifest).unwrap();
    let out = run(&mut push_command(&install, &cluster, &repo_args, cwd, &["--incremental", "--from", &full]));
    assert_failed(&out, 7, &[&format!("backup {full}'s backup_manifest is sha256")]);
    fs::write(&manifest, original).unwrap();
    let names = |r: &serde_json::Value| r["name"].as_str().unwrap().to_owned();
    let listed: Vec<String> = listed_records_in(&install, &repo_args, cwd).iter().map(names).collect();
    assert_eq!(listed, [&*full, &*first, &*second, &*third, &*fourth], "the refused backups left no record");
    assert_eq!(repo.keys_under("catalog/").len(), 5, "and no claim: {:?}", repo.keys_under("catalog/"));

    // --- A parent whose own chain is broken: an incremental on it could never restore either. ---
    let first_record = repo.object_file(&format!("catalog/{first}.json"));
    let first_bytes = fs::read(&first_record).unwrap();
    fs::remove_file(&first_record).unwrap();
    for args in [&["--incremental"][..], &["--incremental", "--from", &second]] {
        let out = run(&mut push_command(&install, &cluster, &repo_args, cwd, args));
        assert_failed(&out, 7, &["cannot take an incremental backup on top of", &first, "no longer in the catalog"]);
    }
    assert_eq!(repo.keys_under("catalog/").len(), 4, "nothing written: {:?}", repo.keys_under("catalog/"));
    let (fallback, out) = push(&cluster, &repo_args, cwd, &["--incremental", "--full-if-needed"]);
    assert!(out.stderr.contains("taking a full backup (--full-if-needed)"), "{}", out.stderr);
    let record = &listed_records_in(&install, &repo_args, cwd)[4];
    assert_eq!((record["name"].as_str(), record["backup_type"].as_str()), (Some(&*fallback), Some("full")));
    fs::write(&first_record, first_bytes).unwrap();

    // --- The chain --from made (full, third) restores without the damaged-then-repaired middle. ---
    lose(cluster);
    let (restored, out) = restore(&install, &repo_args, cwd, "inc-third", &third, &["--target-immediate"]);
    assert!(out.stderr.contains(&format!("combined a chain of 2 backups, from {full}")), "{}", out.stderr);
    assert_eq!(snapshot(&restored), at_third, "the backup --from made, restored");
}

/// Without WAL summaries, with no backup to build on and on PostgreSQL 16: one-line errors that say
/// why, and `--full-if-needed` takes a full backup instead.
#[test]
fn incremental_refusals_and_full_if_needed() {
    let install = PgInstall::of(18);
    let store = &Scratch::new("inc-refusals");
    let repo = &Repository::local(store);
    let repo_args = repo.cli_args();
    let cwd = store.path();
    let cluster = cluster_in(&install, "inc-refusals", repo, false, "1");

    let out = run(&mut push_command(&install, &cluster, &repo_args, cwd, &["--incremental"]));
    assert_failed(&out, 1, &["no complete backup of this cluster", "take a full one first"]);
    let (fallback, out) = push(&cluster, &repo_args, cwd, &["--incremental", "--full-if-needed"]);
    assert!(out.stderr.contains("taking a full backup (--full-if-needed)"), "{}", out.stderr);
    assert!(out.stderr.contains(&format!("backup {fallback} complete (full)")), "{}", out.stderr);

    let out = run(&mut push_command(&install, &cluster, &repo_args, cwd, &["--incremental"]));
    assert_failed(&out, 10, &["WAL summarization is not enabled", "summarize_wal = on"]);
    let catalog = repo.keys_under("catalog/");
    assert_eq!(catalog, [format!("catalog/{fallback}.json")], "no record and no claim left by the refused backup");
    assert_eq!(repo.keys_under("backups/").iter().filter(|k| !k.contains(&fallback)).count(), 0, "no objects left");
    let (second, out) = push(&cluster, &repo_args, cwd, &["--incremental", "--full-if-needed"]);
    assert!(out.stderr.contains("WAL summarization is not enabled"), "says why: {}", out.stderr);
    let records = listed_records_in(&install, &repo_args, cwd);
    assert_eq!(records[1]["name"], second.as_str());
    assert_eq!(records[1]["backup_type"], "full", "{:#}", records[1]);
    drop(cluster);

    // --- PostgreSQL 16: its pg_basebackup, then 18's against its server. ---
    let old = PgInstall::of(16);
    let store = &Scratch::new("inc-16");
    let repo = &Repository::local(store);
    let repo_args = repo.cli_args();
    let cluster = cluster_in(&old, "inc-16", repo, false, "1");
    push(&cluster, &repo_args, store.path(), &[]);
    let out = run(&mut push_command(&old, &cluster, &repo_args, store.path(), &["--incremental"]));
    assert_failed(&out, 10, &["16.", "cannot take incremental backups", "PostgreSQL 17 or later"]);
    let out = run(&mut push_command(&install, &cluster, &repo_args, store.path(), &["--incremental"]));
    assert_failed(&out, 10, &["the server is older than PostgreSQL 17"]);
    assert_eq!(repo.keys_under("catalog/").len(), 1, "only the full backup: {:?}", repo.keys_under("catalog/"));
}

/// PostgreSQL 17: an incremental backup taken by its own pg_basebackup, restored through its own
/// pg_combinebackup when the build has one; PostgreSQL 18's pg_combinebackup is refused for it.
#[test]
fn postgresql_17_chain() {
    let install = PgInstall::of(17);
    let store = &Scratch::new("inc-17");
    let repo = &Repository::local(store);
    let repo_args = repo.cli_args();
    let cwd = store.path();
    let cluster = cluster_in(&install, "inc-17", repo, true, "1");
    push(&cluster, &repo_args, cwd, &[]);
    write_batch(&cluster, "a", 100);
    let at_incremental = snapshot(&cluster);
    let (incremental, _) = push(&cluster, &repo_args, cwd, &["--incremental"]);
    lose(cluster);

    // 18's pg_combinebackup (with 17's pg_verifybackup) is of the wrong version: exit 10, nothing downloaded.
    let newer = PgInstall::of(18).program("pg_combinebackup");
    let mut tools = vec![("pg_combinebackup", format!("exec {} \"$@\"", newer.display()))];
    if install.has_own("pg_verifybackup") {
        tools.push(("pg_verifybackup", format!("exec {} \"$@\"", install.program("pg_verifybackup").display())));
    }
    let mixed = tool_dir(store, "mixed", &tools);
    let mixed_args = config_with_bin(store, repo, "mixed.toml", &mixed);
    let target = store.path().join("restored");
    let out = base_fetch_in(&install, &mixed_args, cwd, &incremental, &target, &[]);
    assert_failed(&out, 10, &["pg_combinebackup", "the backup is PostgreSQL 17", "18."]);
    assert_absent(&target);

    if install.has_own("pg_combinebackup") {
        let (restored, out) =
            restore(&install, &repo_args, cwd, "inc-17-restored", &incremental, &["--target-immediate"]);
        assert!(out.stderr.contains("combined a chain of 2 backups"), "{}", out.stderr);
        assert_eq!(snapshot(&restored), at_incremental);
    } else {
        // A server-only build: only 18's programs are on PATH, and the first one base-fetch needs of
        // the backup's version (pg_verifybackup, then pg_combinebackup) is refused before any download.
        let out = base_fetch_in(&install, &repo_args, cwd, &incremental, &target, &[]);
        let first_missing = if install.has_own("pg_verifybackup") { "pg_combinebackup" } else { "pg_verifybackup" };
        assert_failed(&out, 10, &[first_missing, "the backup is PostgreSQL 17", "18."]);
        assert_absent(&target);
    }
}

/// A chain of a cluster with a tablespace: each link's tablespace archive restored beside it in the
/// scratch space, and the combined tablespace mapped to its new directory, as for a full backup.
#[test]
fn a_chain_with_a_tablespace_is_restored_elsewhere() {
    let install = PgInstall::of(18);
    let store = &Scratch::new("inc-ts");
    let repo = &Repository::local(store);
    let spool = store.mkdir("spool");
    let old_location = store.mkdir("tablespace");
    let new_location = store.path().join("tablespace-restored");
    let tables = format!("[base]\nspool_dir = \"{}\"", spool.display());
    let config = repo.write_config(store.path(), "ts.toml", ConfigLines { tables: &tables, ..ConfigLines::default() });
    let repo_args: Vec<OsString> = vec!["--config".into(), config.into()];
    let cwd = store.path();
    let cluster = cluster_in(&install, "inc-ts", repo, true, "1");
    cluster.psql(&format!("create tablespace extra location '{}'", old_location.display()));
    cluster.psql("create table far(n int) tablespace extra");
    cluster.psql("insert into far select g from generate_series(1, 50000) g");
    push(&cluster, &repo_args, cwd, &[]);
    cluster.psql("insert into far select g from generate_series(50001, 50100) g");
    cluster.psql("update far set n = -n where n <= 10");
    let (incremental, _) = push(&cluster, &repo_args, cwd, &["--incremental"]);
    let records = listed_records_in(&install, &repo_args, cwd);
    assert_eq!(records[1]["archives"].as_array().map(Vec::len), Some(2), "base.tar and the tablespace's");
    lose(cluster);

    let mapping = format!("{}={}", old_location.display(), new_location.display());
    let (restored, out) = restore(
        &install,
        &repo_args,
        cwd,
        "inc-ts-restored",
        &incremental,
        &["--target-immediate", "--tablespace-mapping", &mapping],
    );
    assert!(out.stderr.contains("combined a chain of 2 backups"), "{}", out.stderr);
    assert_eq!(restored.count("select count(*) from far"), 50100);
    assert_eq!(restored.count("select count(*) from far where n < 0"), 10, "the changed rows, combined");
    assert_eq!(
        restored.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'extra'"),
        new_location.to_str().unwrap()
    );
}
