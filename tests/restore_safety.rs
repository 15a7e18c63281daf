//! Restores that cannot hurt the repository or themselves, against a real PostgreSQL 15 on a
//! local-disk repository (none of this depends on the backend):
//!
//! - a drill restore, promoted and written to beside the running primary, archives nothing into the
//!   repository unless `--keep-archiving` is given, so a later restore of the primary still returns
//!   all of its rows;
//! - a backup taken from a streaming standby restores as a point-in-time recovery that reaches its
//!   target and promotes (or, with `--standby`, as a standby);
//! - `LATEST` picks a backup on the history of the timeline recovery will follow, never one of a
//!   branch that a point-in-time restore abandoned;
//! - a base-fetch killed after any of its steps leaves a directory PostgreSQL refuses to start.
//!
//! What PostgreSQL 15 was found to do (checked with real servers, as these tests do):
//! - `pg_basebackup -Ft` from a standby made with `pg_basebackup -R` carries `standby.signal`, and its
//!   `postgresql.auto.conf` carries the standby's `primary_conninfo` (and `backup_label.old`).
//!   With both `standby.signal` and `recovery.signal` present PostgreSQL runs as a standby: it still
//!   stops and promotes at a target time, but restored to the end of the archive it never ends
//!   recovery (it streams from the server `primary_conninfo` names, here the live primary), and
//!   wal-fetch, seeing standby.signal, reports every failure as "absent".
//! - A data directory without `global/pg_control` does not start: the postmaster exits with "could
//!   not find the database system" before it does anything else.
//! - pg_verifybackup accepts a manifest whose pg_control entry is renamed (with the manifest's
//!   checksum recomputed) and then checks the renamed file's size and checksum.

use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::Duration;

use walship_tests::backups::{base_command, base_fetch, base_push};
use walship_tests::pg::{Cluster, WAIT_TIMEOUT};
use walship_tests::repository::Repository;
use walship_tests::{Output, Scratch, run, wait_until};

/// base-fetch aborts (as a kill would) right after the step named `base-fetch:<step>:abort`.
const ABORT_HOOK: &str = walship::failpoint::FAILPOINT_VAR;

fn abort_after(step: &str) -> String {
    format!("base-fetch:{step}:abort")
}

fn add(cluster: &Cluster, batch: &str, rows: u32) {
    cluster.psql(&format!("insert into marks select '{batch}', g from generate_series(1, {rows}) g"));
}

/// Rows per batch, as `batch:count` sorted by batch, so that a failure shows the whole picture.
fn batches(cluster: &Cluster) -> String {
    cluster.psql("select string_agg(batch || ':' || n, ' ' order by batch) from (select batch, count(*) n from marks group by batch) b")
}

/// Switches to a new WAL file and waits until the one completed is in the repository.
fn archive_all(cluster: &Cluster) {
    let segment = cluster.switch_wal();
    cluster.wait_archived(&segment, WAIT_TIMEOUT);
}

fn sleep_past_clock_tick() {
    // A clear gap on either side of a target time keeps the tests independent of clock granularity.
    std::thread::sleep(Duration::from_millis(1100));
}

/// The server's current time as `--target-time` takes it.
fn now(cluster: &Cluster) -> String {
    cluster.psql("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
}

/// A repository on local disk in a scratch directory of its own, which is also where the binaries
/// run from, and the command-line arguments that name it.
struct Setup {
    store: Scratch,
    repo: Repository,
    args: Vec<OsString>,
}

impl Setup {
    fn new(label: &str) -> Setup {
        let store = Scratch::new(label);
        let repo = Repository::local(&store);
        let args = repo.cli_args();
        Setup { store, repo, args }
    }

    /// Where the binaries run from, and where restores that need no cluster go.
    fn cwd(&self) -> &Path {
        self.store.path()
    }

    /// A primary with 1 MiB segments archiving into the repository, with a `marks` table holding
    /// `rows` rows of `batch`.
    fn primary(&self, name: &str, batch: &str, rows: u32) -> Cluster {
        // pg_basebackup -X fetch collects the backup's WAL at its end.
        let primary = Cluster::start_archiving(name, &self.repo.archive_command(), &[("wal_keep_size", "64MB")]);
        primary.psql("create table marks(batch text, n int)");
        add(&primary, batch, rows);
        primary
    }

    /// [`primary`](Self::primary), and a base backup of it with those rows; returns the backup's name
    /// too.
    #[track_caller]
    fn backed_up_primary(&self, name: &str, batch: &str, rows: u32) -> (Cluster, String) {
        let primary = self.primary(name, batch, rows);
        let backup = self.backup(&primary);
        (primary, backup)
    }

    /// A base backup of `cluster` in the repository; returns its name.
    #[track_caller]
    fn backup(&self, cluster: &Cluster) -> String {
        base_push(cluster, &self.args, self.cwd(), &[]).0
    }

    /// `base-fetch BACKUP DIR EXTRA`, whatever it does.
    fn fetch(&self, backup: &str, dir: &Path, extra: &[&str]) -> Output {
        base_fetch(&self.args, self.cwd(), backup, dir, extra)
    }

    /// Runs base-fetch into a new cluster's data directory; panics unless it succeeded. Returns the
    /// cluster (pointed at its own socket, not started) and base-fetch's output.
    #[track_caller]
    fn restore(&self, name: &str, backup: &str, extra: &[&str]) -> (Cluster, Output) {
        let cluster = Cluster::without_data_dir(name);
        let out = self.fetch(backup, cluster.data_dir(), extra);
        assert_eq!(out.code, Some(0), "base-fetch {backup} {extra:?} failed: {out:#?}");
        assert!(out.stderr.contains("backup successfully verified"), "pg_verifybackup ran: {}", out.stderr);
        cluster.adopt_data_dir();
        (cluster, out)
    }
}

fn auto_conf(cluster: &Cluster) -> String {
    fs::read_to_string(cluster.data_dir().join("postgresql.auto.conf")).expect("postgresql.auto.conf")
}

/// Lines of postgresql.auto.conf that set `key` (comments excluded).
fn active_settings(cluster: &Cluster, key: &str) -> Vec<String> {
    auto_conf(cluster).lines().filter(|line| line.trim_start().starts_with(key)).map(str::to_owned).collect()
}

/// Whether a WAL file name (of a segment, a `.partial` segment or a history file) is on `timeline`.
fn on_timeline(key: &str, timeline: u32) -> bool {
    key.rsplit('/').next().is_some_and(|name| name.starts_with(&format!("{timeline:08X}")))
}

/// A drill: the primary archives into the repository and keeps running; a restore of its backup
/// (no flag) is started, reaches the end of the archive, promotes onto timeline 2 and is written
/// to. Its archiver tries, fails (archive_command = 'false') and the repository gets nothing of it:
/// no 00000002.history, no timeline-2 segment, no .partial. A later restore of the primary then
/// follows timeline 1 and returns every row the primary wrote, the later ones included.
///
/// Without the fix the drill archives its history file and segments (same system identifier, so the
/// identity check lets them in), and the later restore follows the drill's timeline 2
/// (`recovery_target_timeline = latest`): the drill's rows appear, the primary's later rows do not.
#[test]
fn a_drill_restore_archives_nothing_into_the_repository() {
    let s = Setup::new("drill");
    let (primary, name) = s.backed_up_primary("drill-primary", "before-backup", 100);
    add(&primary, "after-backup", 200);
    archive_all(&primary);

    let wal_before = s.repo.keys_under("wal/");
    let (mut drill, fetch) = s.restore("drill", "LATEST", &[]);
    assert!(fetch.stderr.contains("archiving is off in the restored cluster"), "base-fetch's log: {}", fetch.stderr);
    assert_eq!(active_settings(&drill, "archive_command"), ["archive_command = 'false'"], "{}", auto_conf(&drill));
    assert_eq!(active_settings(&drill, "archive_library"), ["archive_library = ''"], "{}", auto_conf(&drill));
    drill.start();
    drill.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(drill.checkpoint_timeline(), 2, "the drill promoted onto timeline 2");
    assert_eq!(batches(&drill), "after-backup:200 before-backup:100");
    add(&drill, "drill", 300);
    let last = drill.switch_wal();
    drill.switch_wal();
    // The archiver has had its go once it failed (the fix) or got as far as the drill's segments.
    let stats = wait_until("the drill's archiver has tried", || {
        let stats = drill.psql(
            "select coalesce(last_failed_wal, ''), coalesce(last_archived_wal, ''), failed_count from pg_stat_archiver",
        );
        let mut fields = stats.split('|');
        let (failed, archived) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        (!failed.is_empty() || archived == last).then_some(stats)
    });
    let drill_footprint: Vec<String> = s
        .repo
        .keys_under("wal/")
        .into_iter()
        .filter(|key| !wal_before.contains(key))
        // The primary may complete a segment of its own meanwhile; the drill writes only on timeline
        // 2, apart from a .partial of timeline 1.
        .filter(|key| on_timeline(key, 2) || key.ends_with(".partial"))
        .collect();
    assert_eq!(drill_footprint, Vec::<String>::new(), "the drill archived into the repository ({stats})");
    assert!(stats.starts_with("00000002.history|"), "the drill's archiver failed on its history file: {stats}");
    assert!(!s.repo.object_file("wal/history/00000002.history").exists());
    drill.crash();
    drop(drill);

    add(&primary, "later", 400);
    archive_all(&primary);
    let (mut later, fetch) = s.restore("drill-later", "LATEST", &[]);
    assert_eq!(fetch.stdout, format!("{name}\n"));
    later.start();
    later.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(batches(&later), "after-backup:200 before-backup:100 later:400", "every row of the primary");
    assert_eq!(later.checkpoint_timeline(), 2, "timeline 1 followed to its end");
}

/// The names of the members of a stored base.tar, and the content of one of them.
fn tar_members(repo: &Repository, backup: &str, wanted: &str) -> (Vec<String>, Option<String>) {
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(repo.object_file(&format!("catalog/{backup}.json"))).unwrap()).unwrap();
    let mut tar = Vec::new();
    for part in record["archives"][0]["parts"].as_array().expect("parts") {
        let stored = fs::read(repo.object_file(part["key"].as_str().unwrap())).unwrap();
        tar.extend(walship::codec::decode_all(&stored).expect("the part decodes"));
    }
    let (mut names, mut content, mut at) = (Vec::new(), None, 0);
    // ustar: a 512-byte header (name at 0, octal size at 124), then the data padded to 512 bytes.
    while at + 512 <= tar.len() && tar[at] != 0 {
        let field = |range: std::ops::Range<usize>| {
            String::from_utf8_lossy(&tar[at + range.start..at + range.end]).trim_end_matches(['\0', ' ']).to_owned()
        };
        let name = field(0..100);
        let size = usize::from_str_radix(field(124..136).trim(), 8).expect("octal size");
        if name == wanted {
            content = Some(String::from_utf8_lossy(&tar[at + 512..at + 512 + size]).into_owned());
        }
        names.push(name);
        at += 512 + size.div_ceil(512) * 512;
    }
    (names, content)
}

/// base-push from a streaming standby, then base-fetch without --standby beside the still-running
/// primary, to a target time and to the end of the archive: both promote, with exact row counts.
/// The standby's `standby.signal` and `primary_conninfo`, which the backup carries, are gone;
/// without the fix the restore to the end of the archive comes up as a standby streaming from the
/// primary and never promotes. With --standby it is a standby.
#[test]
fn a_backup_from_a_standby_restores_as_a_point_in_time_recovery() {
    let s = Setup::new("from-standby");
    let primary = s.primary("fs-primary", "a", 100);
    let mut standby = Cluster::standby_of(&primary, "fs-standby");
    standby.start();
    standby.wait_replayed(&primary);
    let name = s.backup(&standby);
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(s.repo.object_file(&format!("catalog/{name}.json"))).unwrap()).unwrap();
    assert_eq!(record["backup_from"], "standby", "{record:#}");
    let (members, auto_conf_in_tar) = tar_members(&s.repo, &name, "postgresql.auto.conf");
    assert!(members.iter().any(|m| m == "standby.signal"), "the tar carries standby.signal: {members:?}");
    assert!(auto_conf_in_tar.unwrap_or_default().contains("primary_conninfo = "), "and primary_conninfo");

    add(&primary, "b", 200);
    sleep_past_clock_tick();
    let target = now(&primary);
    sleep_past_clock_tick();
    add(&primary, "c", 300);
    archive_all(&primary);

    let (mut restored, fetch) = s.restore("fs-pitr", "LATEST", &["--target-time", &target]);
    assert!(fetch.stderr.contains("was taken from a standby"), "base-fetch's log: {}", fetch.stderr);
    let data = restored.data_dir();
    assert!(!data.join("standby.signal").exists(), "standby.signal removed");
    assert!(data.join("recovery.signal").is_file());
    assert_eq!(active_settings(&restored, "primary_conninfo"), Vec::<String>::new(), "{}", auto_conf(&restored));
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(batches(&restored), "a:100 b:200", "the rows up to the target and none after it");
    assert_eq!(restored.checkpoint_timeline(), 2, "promoted");
    assert!(restored.log_contents().contains("recovery stopping before commit"), "{}", restored.log_tail());
    drop(restored);

    // To the end of the archive: what a standby would never reach.
    let (mut whole, _) = s.restore("fs-end", "LATEST", &[]);
    assert!(!whole.data_dir().join("standby.signal").exists(), "standby.signal removed");
    whole.start();
    whole.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(batches(&whole), "a:100 b:200 c:300", "everything archived");
    assert_eq!(whole.checkpoint_timeline(), 2, "promoted");
    drop(whole);

    let (mut follower, _) = s.restore("fs-standby2", "LATEST", &["--standby"]);
    assert!(follower.data_dir().join("standby.signal").is_file());
    assert_eq!(active_settings(&follower, "primary_conninfo").len(), 1, "{}", auto_conf(&follower));
    follower.start();
    follower.wait_replayed(&primary);
    assert_eq!(follower.psql("select pg_is_in_recovery()"), "t", "still a standby");
    assert_eq!(batches(&follower), "a:100 b:200 c:300");
}

/// Backups A (timeline 1) and B (timeline 1, after the point where a restore of A branched off onto
/// timeline 2 and went on archiving, with --keep-archiving). The original primary keeps writing on
/// timeline 1, which the repository's history has abandoned. `base-fetch LATEST` must take A: it
/// lies on timeline 2's history. Without the fix it takes B, the newest, and PostgreSQL refuses to
/// start ("requested timeline 2 is not a child of this server's history").
#[test]
fn latest_follows_the_timeline_not_the_newest_backup() {
    let s = Setup::new("timelines");
    let (primary, a) = s.backed_up_primary("tl-primary", "a1", 100);
    add(&primary, "a2", 200);
    sleep_past_clock_tick();
    let fork = now(&primary);
    sleep_past_clock_tick();
    add(&primary, "abandoned", 300);
    let b = s.backup(&primary);
    assert!(b > a);
    archive_all(&primary);

    // The restore to the fork point, to be the new primary: it archives timeline 2.
    let (mut tl2, fetch) = s.restore("tl2", "LATEST", &["--target-time", &fork, "--keep-archiving"]);
    assert_eq!(fetch.stdout, format!("{a}\n"), "B finished after the target");
    assert!(!fetch.stderr.contains("archiving is off"), "{}", fetch.stderr);
    assert_eq!(active_settings(&tl2, "archive_command"), Vec::<String>::new(), "{}", auto_conf(&tl2));
    tl2.start();
    tl2.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(tl2.checkpoint_timeline(), 2);
    add(&tl2, "c", 400);
    archive_all(&tl2);
    tl2.wait_archived("00000002.history", WAIT_TIMEOUT);
    assert!(s.repo.object_file("wal/history/00000002.history").is_file(), "--keep-archiving kept archiving");
    tl2.crash();
    drop(tl2);

    // A named backup on the abandoned branch, and a timeline nothing lies on: refused before anything.
    let nowhere = s.cwd().join("nowhere");
    let out = s.fetch(&b, &nowhere, &[]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("cannot reach timeline 2") && out.stderr.contains("abandoned branch"), "{out:#?}");
    let out = s.fetch("LATEST", &nowhere, &["--target-timeline", "5"]);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("history of timeline 5"), "{out:#?}");
    assert!(!nowhere.exists());

    let (mut latest, fetch) = s.restore("tl-latest", "LATEST", &[]);
    assert_eq!(fetch.stdout, format!("{a}\n"), "A lies on timeline 2's history, B does not");
    latest.start();
    latest.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(batches(&latest), "a1:100 a2:200 c:400", "A's rows and timeline 2's, none of the abandoned branch");
    assert_eq!(latest.checkpoint_timeline(), 3);
    drop(latest);

    // Asked for explicitly, the old branch is still there to restore.
    let (_, fetch) = s.restore("tl-one", "LATEST", &["--target-timeline", "1"]);
    assert_eq!(fetch.stdout, format!("{b}\n"));
    drop(primary);
}

/// base-fetch killed (abort, through the test-only hook) right after each of its steps. Before the
/// last step the directory has no global/pg_control and PostgreSQL refuses to start it; the
/// recovery settings are in place before pg_verifybackup runs and pg_control comes last; a rerun
/// into the cut-short directory says what it is, and one into a fresh directory restores.
/// Without the fix (pg_control put in place before the settings and the verification) the
/// directories of the later steps are startable.
#[test]
fn a_killed_base_fetch_leaves_nothing_startable() {
    let s = Setup::new("fetch-abort");
    let (mut primary, name) = s.backed_up_primary("abort-primary", "a", 100);
    add(&primary, "b", 50);
    archive_all(&primary);
    primary.crash();
    drop(primary);

    for (step, settings_written) in [("extracted", false), ("synced", false), ("configured", true), ("verified", true)]
    {
        let mut cut = Cluster::without_data_dir(&format!("abort-{step}"));
        let data = cut.data_dir().to_owned();
        let out =
            run(base_command("base-fetch", &s.args, s.cwd()).env(ABORT_HOOK, abort_after(step)).arg(&name).arg(&data));
        assert_eq!(out.code, None, "base-fetch aborted after {step}: {out:#?}");
        assert!(!data.join("global/pg_control").exists(), "after {step}: pg_control is not in place");
        assert!(data.join("global/pg_control.walship-incomplete").is_file(), "after {step}: held back");
        assert_eq!(data.join("recovery.signal").exists(), settings_written, "after {step}: recovery.signal");
        cut.adopt_data_dir();
        let start = cut.try_start();
        assert_ne!(start.code, Some(0), "after {step}: the directory must not start: {start:#?}");
        assert!(cut.log_contents().contains("could not find the database system"), "after {step}: {}", cut.log_tail());
        let again = s.fetch(&name, &data, &[]);
        assert_eq!(again.code, Some(4), "{again:#?}");
        assert!(again.stderr.contains("a restore that was cut short"), "{again:#?}");
    }

    // Killed after the last step: pg_control is in place, and only then.
    let installed = s.cwd().join("installed");
    let out = run(base_command("base-fetch", &s.args, s.cwd())
        .env(ABORT_HOOK, abort_after("installed"))
        .arg(&name)
        .arg(&installed));
    assert_eq!(out.code, None, "{out:#?}");
    assert!(installed.join("global/pg_control").is_file() && installed.join("recovery.signal").is_file());
    assert!(!installed.join("global/pg_control.walship-incomplete").exists());

    let (mut fresh, _) = s.restore("abort-fresh", &name, &[]);
    fresh.start();
    fresh.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(batches(&fresh), "a:100 b:50");
}
