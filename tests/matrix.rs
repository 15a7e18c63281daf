//! The version matrix: walship end to end on every PostgreSQL major it supports (13 to 18), each a
//! test of its own so that they run in parallel and fail separately, all one body.
//!
//! A real cluster of that version archives through wal-push while pgbench writes and base-push
//! takes a backup; rows go in with a marker before a target time and more after it; the cluster is
//! lost; base-fetch restores the backup to the target time and the version's own postgres recovers
//! it through wal-fetch, with the rows counted exactly. What differs between versions is checked,
//! not assumed: the WAL page magic the server writes (against PostgreSQL's own table, and walship's
//! reading of it in the repository identity record), the segment size (1 MiB, and 64 MiB on one
//! run), the `backup_manifest` version (1 up to 16, 2 from 17, which also names the system), and
//! that the recovery settings base-fetch writes are ones that version accepts (no warning, no
//! unrecognized parameter in the restored server's log).
//!
//! Every build has a pg_verifybackup of its own version (13's added from Debian 11 by
//! scripts/install-postgres.sh), and base-fetch must say it ran it. Once, on 13, PATH offers only
//! PostgreSQL 18's, as on a machine with a server-only build: base-fetch refuses (exit 10) before
//! downloading anything, and restores with `--no-pg-verifybackup`, the result then checked by 13's
//! own. A build installed without one is restored with that flag too.
//! 13 and 18 also recover from a plain `pg_basebackup -X none` with wal-fetch as restore_command.
//!
//! Kept small (pgbench scale 1, a few seconds of load) so the whole matrix costs a few minutes.

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use walship_tests::assertions::{assert_absent, assert_error};
use walship_tests::backups::{base_command_in, base_push};
use walship_tests::pg::{Cluster, WAIT_TIMEOUT, program_command};
use walship_tests::repository::Repository;
use walship_tests::running::{finish, spawn};
use walship_tests::segments::wal_key;
use walship_tests::versions::{CLIENT_MAJOR, PgInstall};
use walship_tests::{Output, Scratch, run};

const MIB: u32 = 1024 * 1024;

/// `XLOG_PAGE_MAGIC` of each major, from PostgreSQL's `src/include/access/xlog_internal.h`: kept
/// apart from walship's own table so that a wrong entry there shows here.
fn expected_page_magic(major: u32) -> u16 {
    match major {
        13 => 0xD106,
        14 => 0xD10D,
        15 => 0xD110,
        16 => 0xD113,
        17 => 0xD116,
        18 => 0xD118,
        other => panic!("no page magic known for PostgreSQL {other}"),
    }
}

/// `PostgreSQL-Backup-Manifest-Version`, which the server writes: 2 from PostgreSQL 17 (it adds
/// `System-Identifier`, for incremental backups), 1 before.
fn expected_manifest_version(major: u32) -> u64 {
    if major >= 17 { 2 } else { 1 }
}

/// One run of the matrix.
struct Case {
    major: u32,
    /// initdb's `--wal-segsize`, in MiB.
    segment_mb: u32,
    /// Also recover from a plain pg_basebackup with wal-fetch as restore_command.
    plain_pitr: bool,
    /// Restore with only PostgreSQL 18's programs on PATH: base-fetch refuses another version's
    /// pg_verifybackup (exit 10), and restores with `--no-pg-verifybackup`.
    refusal: bool,
}

impl Case {
    fn of(major: u32) -> Case {
        Case { major, segment_mb: 1, plain_pitr: false, refusal: false }
    }

    fn label(&self) -> String {
        match self.segment_mb {
            1 => format!("pg{}", self.major),
            mb => format!("pg{}-{mb}mb", self.major),
        }
    }
}

#[test]
fn pg13() {
    matrix(Case { plain_pitr: true, refusal: true, ..Case::of(13) });
}

#[test]
fn pg14() {
    matrix(Case::of(14));
}

#[test]
fn pg15() {
    matrix(Case::of(15));
}

#[test]
fn pg16() {
    matrix(Case::of(16));
}

#[test]
fn pg16_wal_segsize_64mb() {
    matrix(Case { segment_mb: 64, ..Case::of(16) });
}

#[test]
fn pg17() {
    matrix(Case::of(17));
}

#[test]
fn pg18() {
    matrix(Case { plain_pitr: true, ..Case::of(18) });
}

/// PostgreSQL 14's own pg_basebackup writes a torn tar archive to standard output (its appended
/// backup_manifest is not padded; fixed in 15): base-push refuses it by its version before running
/// it, in one line naming the fix, and the repository stays as it was: nothing made, nothing written.
#[test]
fn pg14_own_pg_basebackup_is_refused() {
    let install = PgInstall::of(14);
    assert!(install.has_own("pg_basebackup"), "the pinned 14 build is complete");
    let own_first = PgInstall { clients: install.own.clone(), ..install.clone() };
    let store = &Scratch::new("matrix-pg14-own-basebackup");
    let repo = &Repository::local(store);
    let mut cluster = Cluster::init_in(&install, "pg14-own-basebackup", Some(1));
    cluster.configure(&[("wal_level", "replica")]);
    cluster.start();
    let mut cmd = base_command_in(&own_first, "base-push", &repo.cli_args(), store.path());
    let out = run(cluster.libpq_env(&mut cmd).args(["--", "--checkpoint=fast"]));
    assert_error(&out, 10, &["pg_basebackup (PostgreSQL) 14.", "broken tar archive", "PostgreSQL 15 or later"]);
    let repo_dir = repo.local_dir().expect("a local repository");
    let made: Vec<_> = fs::read_dir(repo_dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(made.is_empty(), "base-push refused before touching the repository: {made:?}");
}

/// Rows of each batch of markers: (before the target, after it).
fn markers(cluster: &Cluster) -> (i64, i64) {
    (
        cluster.count("select count(*) from marker where batch = 'before'"),
        cluster.count("select count(*) from marker where batch = 'after'"),
    )
}

fn sleep_past_clock_tick() {
    // A clear gap on either side of the target keeps the test independent of clock granularity and
    // of which record recovery stops at.
    std::thread::sleep(Duration::from_millis(1100));
}

/// What the primary was, read before it is lost.
struct Facts {
    system_identifier: String,
    page_magic: u16,
    header: walship::wal::LongPageHeader,
}

fn facts(primary: &Cluster) -> Facts {
    let system_identifier = primary.psql("select system_identifier from pg_control_system()");
    let current = primary.psql("select pg_walfile_name(pg_current_wal_lsn())");
    let path = primary.data_dir().join("pg_wal").join(&current);
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let header = walship::wal::LongPageHeader::parse(&bytes[..walship::wal::LongPageHeader::LEN])
        .unwrap_or_else(|e| panic!("walship cannot read {path:?}'s page header: {e}"));
    Facts { system_identifier, page_magic: u16::from_le_bytes([bytes[0], bytes[1]]), header }
}

/// base-fetch with `install`'s programs first on PATH.
fn base_fetch(install: &PgInstall, repo_args: &[OsString], cwd: &Path, dir: &Path, extra: &[&str]) -> Output {
    run(base_command_in(install, "base-fetch", repo_args, cwd).arg("LATEST").arg(dir).args(extra))
}

/// The JSON object stored at `key` (plain, like the identity and catalog records).
fn json_object(repo: &Repository, key: &str) -> serde_json::Value {
    let path = repo.object_file(key);
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{key} is not JSON: {e}"))
}

/// The backup's stored `backup_manifest`, decoded; checked against the copy base-fetch restored.
fn stored_manifest(repo: &Repository, name: &str, restored: &Path) -> serde_json::Value {
    let path = repo.object_file(&format!("backups/{name}/backup_manifest"));
    let stored = fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let decoded = walship::codec::decode_all(&stored).unwrap_or_else(|e| panic!("{path:?} does not decode: {e}"));
    let on_disk = fs::read(restored.join("backup_manifest")).expect("base-fetch leaves backup_manifest");
    assert!(decoded == on_disk, "the stored backup_manifest differs from the restored one");
    serde_json::from_slice(&decoded).expect("backup_manifest is JSON")
}

/// The repository's identity record, the catalog record and the manifest say what the cluster was.
fn check_records(case: &Case, repo: &Repository, name: &str, facts: &Facts, restored: &Path) -> u64 {
    let segment_size = u64::from(case.segment_mb * MIB);
    let identity = json_object(repo, "repository.json");
    assert_eq!(identity["pg_version"], case.major, "identity record: {identity:#}");
    assert_eq!(identity["wal_segment_size"], segment_size, "identity record: {identity:#}");
    assert_eq!(identity["system_identifier"], facts.system_identifier.as_str(), "identity record: {identity:#}");
    let record = json_object(repo, &format!("catalog/{name}.json"));
    assert_eq!(record["pg_version"], case.major, "catalog record: {record:#}");
    assert_eq!(record["wal_segment_size"], segment_size, "catalog record: {record:#}");
    assert_eq!(record["system_identifier"], facts.system_identifier.as_str(), "catalog record: {record:#}");
    assert_eq!(record["backup_type"], "full", "catalog record: {record:#}");
    let manifest = stored_manifest(repo, name, restored);
    let version = manifest["PostgreSQL-Backup-Manifest-Version"].as_u64().expect("a manifest version");
    assert_eq!(version, expected_manifest_version(case.major), "PostgreSQL {}'s backup_manifest", case.major);
    if version >= 2 {
        let system = manifest["System-Identifier"].as_u64().expect("a version 2 manifest names the system");
        assert_eq!(system.to_string(), facts.system_identifier, "the manifest's System-Identifier");
    } else {
        assert!(manifest.get("System-Identifier").is_none(), "a version 1 manifest has no System-Identifier");
    }
    version
}

/// What the server log of a recovery must and must not hold: it stopped at the target, with WAL
/// from wal-fetch, and no setting base-fetch (or the test) wrote was unknown to this version.
#[track_caller]
fn check_recovery_log(cluster: &Cluster) {
    let log = cluster.log_contents();
    let tail = cluster.log_tail();
    assert!(log.contains("recovery stopping before commit of transaction"), "not stopped at the target\n{tail}");
    assert!(log.contains("restored log file \""), "no WAL came from the archive\n{tail}");
    assert!(!log.contains("wal-fetch: error"), "wal-fetch failed during recovery\n{tail}");
    assert!(!log.contains("unrecognized configuration parameter"), "a setting this version does not know\n{tail}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARNING")).collect();
    assert!(warnings.is_empty(), "warnings in the restored server's log: {warnings:#?}\n{tail}");
}

/// Starts a restored cluster and checks that it recovered to the target: the markers before it,
/// none after, promoted onto timeline 2.
#[track_caller]
fn recover_and_count(cluster: &mut Cluster) {
    cluster.start();
    cluster.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(markers(cluster), (700, 0), "cluster {}: the rows before the target, none after", cluster.name());
    assert_eq!(cluster.checkpoint_timeline(), 2, "cluster {}: promoted onto a new timeline", cluster.name());
    check_recovery_log(cluster);
}

/// With only PostgreSQL 18's pg_verifybackup on PATH (`only_18`), as on a machine with a server-only
/// build of an older version, base-fetch refuses (exit 10) before anything is downloaded; the target
/// directory, absent or empty, is left as it was.
fn check_refusal(case: &Case, only_18: &PgInstall, repo_args: &[OsString], store: &Scratch) {
    let absent = store.path().join("refused-absent");
    let empty = store.mkdir("refused-empty");
    for (dir, existed) in [(&absent, false), (&empty, true)] {
        let out = base_fetch(only_18, repo_args, store.path(), dir, &[]);
        let version = format!("the backup is PostgreSQL {}", case.major);
        assert_error(&out, 10, &["pg_verifybackup", &version, "(PostgreSQL) 18."]);
        assert!(!out.stderr.contains("restoring backup"), "refused before any download: {out:#?}");
        if existed {
            let left: Vec<_> = fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name()).collect();
            assert!(left.is_empty(), "{dir:?} was empty and must stay so: {left:?}");
        } else {
            assert_absent(dir);
        }
    }
}

/// Runs base-fetch with `tools`' programs on PATH, with `--no-pg-verifybackup` when they have no
/// pg_verifybackup of the backup's version, and checks what it said about verification. After a
/// skipped check, the version's own pg_verifybackup (where the build has one) checks the result.
fn restore(
    case: &Case,
    install: &PgInstall,
    tools: &PgInstall,
    repo: (&[OsString], &Path),
    dir: &Path,
    target: &str,
) -> &'static str {
    let (repo_args, cwd) = repo;
    let skip = tools.major != case.major || !tools.has_own("pg_verifybackup");
    let mut extra = vec!["--target-time", target];
    if skip {
        extra.push("--no-pg-verifybackup");
    }
    let fetch = base_fetch(tools, repo_args, cwd, dir, &extra);
    assert_eq!(fetch.code, Some(0), "base-fetch of PostgreSQL {}: {fetch:#?}", case.major);
    let verified = fetch
        .stderr
        .contains(&format!("base-fetch: PostgreSQL {}'s pg_verifybackup: backup successfully verified", case.major));
    let skipped = fetch.stderr.contains(
        "skipped pg_verifybackup (--no-pg-verifybackup): the restored files are not checked against \
         backup_manifest; every part's SHA-256 still is",
    );
    assert_eq!((verified, skipped), (!skip, skip), "base-fetch's log: {}", fetch.stderr);
    let verification = if !skip {
        "run by base-fetch"
    } else if install.has_own("pg_verifybackup") {
        let own = run(program_command(&install.program("pg_verifybackup"), cwd).arg(dir));
        assert!(own.code == Some(0) && own.stdout.contains("backup successfully verified"), "{own:#?}");
        "skipped by base-fetch (--no-pg-verifybackup), run by the test"
    } else {
        "skipped (--no-pg-verifybackup): none of this version"
    };
    let auto_conf = fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap();
    // archive_library exists from PostgreSQL 15 on; an older server refuses to start with it.
    assert_eq!(auto_conf.contains("archive_library"), case.major >= 15, "postgresql.auto.conf: {auto_conf}");
    assert!(auto_conf.contains("recovery_target_time"), "postgresql.auto.conf: {auto_conf}");
    verification
}

/// The shared body (see the module's comment).
fn matrix(case: Case) {
    let started = Instant::now();
    let install = PgInstall::of(case.major);
    let label = case.label();
    let store = &Scratch::new(&format!("matrix-{label}"));
    let repo = &Repository::local(store);
    let repo_args = repo.cli_args();
    let cwd = store.path();

    // --- A cluster of this version, archiving through wal-push. ---
    let mut primary = Cluster::init_in(&install, &format!("{label}-primary"), Some(case.segment_mb));
    primary.configure(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &repo.archive_command()),
        // base-push runs pg_basebackup -X fetch: the backup's WAL must still be there at its end.
        ("wal_keep_size", "256MB"),
    ]);
    primary.start();
    assert_eq!(primary.psql("show server_version_num").parse::<u32>().unwrap() / 10000, case.major);
    assert_eq!(primary.psql("show wal_segment_size"), format!("{}MB", case.segment_mb));
    primary.pgbench(&["-i", "-s", "1", "-q"]);
    primary.psql("create table marker(batch text, n int)");

    // --- The backup, taken while pgbench writes. ---
    let load = spawn(&mut primary.pgbench_command(&["-n", "-c", "2", "-j", "2", "-T", "3"]));
    let (name, _) = base_push(&primary, &repo_args, cwd, &[]);
    let load = finish(load, WAIT_TIMEOUT);
    assert_eq!(load.output.code, Some(0), "pgbench: {:#?}", load.output);
    let plain = case.plain_pitr.then(|| {
        let dir = store.mkdir("plain");
        primary.base_backup(&dir, &["-Fp", "-X", "none"]);
        dir
    });

    // --- Rows before the target time, the target, rows after it. ---
    primary.psql("insert into marker select 'before', g from generate_series(1, 700) g");
    sleep_past_clock_tick();
    let target = primary.psql("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'");
    sleep_past_clock_tick();
    primary.psql("insert into marker select 'after', g from generate_series(1, 300) g");
    assert_eq!(markers(&primary), (700, 300));
    let facts = facts(&primary);
    let last = primary.switch_wal();
    primary.wait_archived(&last, WAIT_TIMEOUT);
    assert!(repo.object_file(&wal_key(&last)).is_file(), "{last} not in the {}", repo.describe());
    primary.crash();
    drop(primary);

    // --- What the server wrote, as PostgreSQL and walship each read it. ---
    assert_eq!(facts.page_magic, expected_page_magic(case.major), "PostgreSQL {}'s WAL page magic", case.major);
    assert_eq!(facts.header.pg_major(), Some(case.major), "walship's reading of the page magic");
    assert_eq!(facts.header.segment_size, case.segment_mb * MIB, "the page header's segment size");

    // --- Restore to the target time with base-fetch; the version's own postgres recovers it. ---
    let tools = if case.refusal { PgInstall::of(CLIENT_MAJOR) } else { install.clone() };
    if case.refusal {
        check_refusal(&case, &tools, &repo_args, store);
    }
    let mut restored = Cluster::without_data_dir_in(&install, &format!("{label}-restored"));
    let verification = restore(&case, &install, &tools, (&repo_args, cwd), restored.data_dir(), &target);
    let manifest_version = check_records(&case, repo, &name, &facts, restored.data_dir());
    restored.adopt_data_dir();
    recover_and_count(&mut restored);
    drop(restored);

    // --- The same target from a plain pg_basebackup, with wal-fetch as restore_command. ---
    if let Some(plain) = plain {
        let settings = [
            ("restore_command", repo.restore_command()),
            ("recovery_target_time", target.clone()),
            ("recovery_target_action", "promote".to_owned()),
        ];
        let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut pitr = Cluster::restore_in(&install, &format!("{label}-plain"), &plain, &settings);
        recover_and_count(&mut pitr);
    }
    eprintln!(
        "matrix {label}: PostgreSQL {}, page magic 0x{:04X}, {} MiB segments, backup_manifest version \
         {manifest_version}, pg_verifybackup {}, {:.1} s",
        case.major,
        facts.page_magic,
        case.segment_mb,
        verification,
        started.elapsed().as_secs_f64()
    );
}
