//! Base backups against a real PostgreSQL 15: `base-push` streams pg_basebackup into the repository
//! while pgbench writes, the cluster is lost, and `base-fetch` restores the backup with recovery
//! settings of its own that take `pg_ctl start` alone to the target time, with exact row counts and
//! sums; `base-list` shows the backup as a table and as JSON. The scenario runs on all three
//! repositories: local disk (`--repo DIR`), S3 (s3s-fs) and SSH (a real sshd), named by `--config`.
//!
//! Then the faults: a base-push killed outright (swept by the next one), one stopped by SIGTERM while
//! a multipart upload is open (it removes its own objects and aborts the upload), pg_basebackup
//! failing, a damaged part, a target directory that is not empty, a target older than every backup
//! and names that are unknown or not names at all.
//!
//! The binaries run as PostgreSQL's OS user, with PostgreSQL 15's programs first on PATH (where
//! base-push finds pg_basebackup and base-fetch pg_verifybackup) and libpq's PGHOST and PGPORT
//! pointing at the test's cluster.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use walship_tests::assertions::{assert_absent, assert_error, files_below};
use walship_tests::backups::{base_command, base_fetch, base_push, base_push_command, damage_middle};
use walship_tests::pg::{Cluster, WAIT_TIMEOUT, pg_bin_dir, pg_command};
use walship_tests::repository::{Backend, ConfigLines, Repository};
use walship_tests::s3::assert_no_multipart_leftovers;
use walship_tests::{Output, Scratch, run, wait_until};

fn base_list(repo_args: &[OsString], cwd: &Path, json: bool) -> Output {
    let mut cmd = base_command("base-list", repo_args, cwd);
    if json {
        cmd.arg("--json");
    }
    let out = run(&mut cmd);
    assert_eq!(out.code, Some(0), "base-list failed: {out:#?}");
    out
}

/// The names in base-list's table, after checking its header.
#[track_caller]
fn listed_names(out: &Output) -> Vec<String> {
    let mut lines = out.stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("NAME"), "base-list's first line is its header: {:?}", out.stdout);
    lines.map(|line| line.split_whitespace().next().unwrap_or_default().to_owned()).collect()
}

/// base-list --json, parsed: one catalog record per backup.
#[track_caller]
fn listed_records(repo_args: &[OsString], cwd: &Path) -> Vec<serde_json::Value> {
    let out = base_list(repo_args, cwd, true);
    let value: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("base-list --json: {e}: {:?}", out.stdout));
    value.as_array().unwrap_or_else(|| panic!("base-list --json prints an array: {value}")).clone()
}

/// A failed command: `code`, nothing on stdout, and stderr ending in exactly one error line, `PROGRAM:
/// error: ... (exit CODE)`, that contains every needle. Lines before it can only be the command's
/// log of what it was doing (base-fetch names the backup it restores before it fails).
#[track_caller]
fn assert_failed(out: &Output, program: &str, code: i32, needles: &[&str]) {
    assert_eq!(out.code, Some(code), "exit code of {program}; output: {out:#?}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {out:#?}");
    let errors: Vec<&str> = out.stderr.lines().filter(|line| line.contains("error")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line: {:?}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert_eq!(errors[0], last, "the error line comes last: {:?}", out.stderr);
    assert!(last.starts_with(&format!("{program}: error: ")), "error line {last:?}");
    assert!(last.ends_with(&format!("(exit {code})")), "error line {last:?} names its exit code");
    for needle in needles {
        assert!(last.contains(needle), "the error should mention {needle:?}: {last:?}");
    }
}

/// [`assert_failed`] for a command that fails before it has anything to log: the error line is all
/// of stderr.
#[track_caller]
fn assert_only_error(out: &Output, program: &str, code: i32, needles: &[&str]) {
    assert_error(out, code, needles);
    assert_failed(out, program, code, needles);
}

/// A process the test started in the background, killed (and reaped) if the test ends first.
struct Background {
    what: String,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    /// Spawns `cmd` with its output going to files in `dir`.
    fn spawn(what: &str, cmd: &mut Command, dir: &Path) -> Background {
        let stem: String = what.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let stdout = dir.join(format!("{stem}.stdout"));
        let stderr = dir.join(format!("{stem}.stderr"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Background { what: what.to_owned(), child: Some(child), stdout, stderr }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether it still runs (and not reaped yet).
    fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| child.try_wait().expect("try_wait").is_none())
    }

    /// Sends `signal` and waits for the process to end; returns what it did.
    fn signal_and_wait(&mut self, signal: i32) -> Output {
        // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
        unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        self.wait()
    }

    fn wait(&mut self) -> Output {
        let status = self.child.take().expect("running").wait().expect("wait");
        Output {
            code: status.code(),
            stdout: fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }

    fn output_so_far(&self) -> String {
        format!(
            "{}: stdout {:?}, stderr {:?}",
            self.what,
            fs::read_to_string(&self.stdout).unwrap_or_default(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The processes whose parent is `pid`, with their command names.
fn children_of(pid: u32) -> Vec<(u32, String)> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    let mut children = Vec::new();
    for entry in entries.flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let comm = head.split_once('(').map(|(_, c)| c.to_owned()).unwrap_or_default();
        if rest.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            children.push((child, comm));
        }
    }
    children
}

/// Whether `pid` still runs (a zombie does not).
fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// The pg_basebackup that base-push (`pid`) runs, once it has started it.
fn pg_basebackup_of(base_push: &mut Background) -> u32 {
    let pid = base_push.pid();
    wait_until("base-push has started pg_basebackup", || {
        assert!(base_push.is_running(), "base-push ended before pg_basebackup was seen: {}", base_push.output_so_far());
        children_of(pid).into_iter().find(|(_, comm)| comm == "pg_basebackup").map(|(pid, _)| pid)
    })
}

/// The names of the directories under `backups/` (a backup's objects, complete or not).
fn backup_dirs(repo: &Repository) -> Vec<String> {
    let Ok(entries) = fs::read_dir(repo.object_file("backups")) else { return Vec::new() };
    let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The catalog records in the repository, as keys.
fn catalog(repo: &Repository) -> Vec<String> {
    repo.keys_under("catalog/")
}

/// What the scenario checks after the restore: every value at the target time.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    history_rows: i64,
    balance_sum: i64,
    marker_rows: i64,
    late_rows: i64,
}

fn snapshot(cluster: &Cluster) -> Snapshot {
    Snapshot {
        history_rows: cluster.count("select count(*) from pgbench_history"),
        balance_sum: cluster.count("select sum(abalance) from pgbench_accounts"),
        marker_rows: cluster.count("select count(*) from marker where batch = 'before'"),
        late_rows: cluster.count("select count(*) from marker where batch = 'after'"),
    }
}

fn sleep_past_clock_tick() {
    // Commit timestamps have microsecond resolution, but a clear gap on either side of the target
    // keeps the test independent of clock granularity and of which record recovery stops at.
    std::thread::sleep(Duration::from_millis(1100));
}

walship_tests::every_backend!(also_encrypted: backup_under_load_then_restore_to_target_time);

/// The whole scenario against a new repository of kind `backend`; the backend's label tells the
/// clusters of one run from another's.
fn backup_under_load_then_restore_to_target_time(backend: Backend) {
    let label = backend.label();
    let store = &Scratch::new(&format!("base-{label}"));
    let repo = &Repository::new(backend, store);
    // Small parts, so that the backup is many objects, downloaded several at a time on restore, and
    // progress lines once a second (stderr is not a terminal here). base-fetch hands the same
    // --config on to the restore_command it writes.
    let tables = "[base]\npart_size = \"2MiB\"\ntransfer_concurrency = 3\nprogress_interval_secs = 1";
    let config = repo.write_config(store.path(), "base.toml", ConfigLines { tables, ..ConfigLines::default() });
    let repo_args: Vec<OsString> = vec!["--config".into(), config.clone().into()];
    let cwd = store.path();

    // --- The original cluster, archiving through wal-push. ---
    let mut primary = Cluster::init(&format!("{label}-base-primary"), Some(1));
    primary.configure(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &repo.archive_command()),
        // pg_basebackup -X fetch collects the backup's WAL at its end: a checkpoint under load must
        // not have recycled it by then (pg_basebackup's documentation asks for this).
        ("wal_keep_size", "256MB"),
    ]);
    primary.start();
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    primary.psql("create table marker(batch text, n int)");

    // --- The backup, taken while pgbench writes. ---
    // The load runs until the backup is done, so that it certainly overlaps it, and is then stopped.
    let mut load = Background::spawn(
        "pgbench load",
        &mut primary.pgbench_command(&["-n", "-c", "2", "-j", "2", "-T", "600"]),
        cwd,
    );
    wait_until("pgbench's two clients are connected and working", || {
        assert!(load.is_running(), "pgbench ended early: {}", load.output_so_far());
        let busy = primary.count("select count(*) from pg_stat_activity where application_name = 'pgbench'");
        let history = primary.count("select count(*) from pgbench_history");
        (busy == 2 && history > 0).then_some(())
    });
    let history_at_backup_start = primary.count("select count(*) from pgbench_history");
    // Throttled, so that the load runs through a good part of the backup (several seconds).
    let (name, push) = base_push(&primary, &repo_args, cwd, &["--max-rate=8M"]);
    assert!(load.is_running(), "the load must outlast the backup: {}", load.output_so_far());
    let history_at_backup_end = primary.count("select count(*) from pgbench_history");
    assert!(
        history_at_backup_end > history_at_backup_start,
        "pgbench committed nothing while base-push ran ({history_at_backup_start} history rows before and after)"
    );
    let stopped = load.signal_and_wait(libc::SIGKILL);
    assert_eq!(stopped.code, None, "pgbench was killed: {stopped:#?}");
    // Its backends end once they notice; until then a transaction of theirs could still commit.
    wait_until("pgbench's backends are gone", || {
        (primary.count("select count(*) from pg_stat_activity where application_name = 'pgbench'") == 0).then_some(())
    });
    assert!(push.stderr.contains(&format!("backup {name} complete")), "base-push's log: {}", push.stderr);
    assert!(push.stderr.contains("base-push: progress: "), "no progress lines in base-push's log: {}", push.stderr);
    assert!(
        repo.object_file(&format!("catalog/{name}.json")).is_file(),
        "no catalog record in the {}",
        repo.describe()
    );
    assert!(
        repo.object_file(&format!("backups/{name}/base.tar.000001")).is_file(),
        "no part in the {}",
        repo.describe()
    );
    assert!(repo.object_file(&format!("backups/{name}/backup_manifest")).is_file());
    if let Repository::S3 { server, .. } = repo {
        assert_no_multipart_leftovers(server, "after base-push");
    }

    // --- Writes after the backup; the target time; writes after it. ---
    primary.psql("insert into marker select 'before', g from generate_series(1, 700) g");
    primary.psql("update pgbench_accounts set abalance = abalance + 7 where aid <= 100");
    primary.psql("insert into pgbench_history(tid, bid, aid, delta, mtime) values (1, 1, 1, 7, now())");
    let at_target = snapshot(&primary);
    assert_eq!((at_target.marker_rows, at_target.late_rows), (700, 0));
    sleep_past_clock_tick();
    let target = primary.psql("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'");
    sleep_past_clock_tick();
    primary.psql("insert into marker select 'after', g from generate_series(1, 300) g");
    primary.psql("update pgbench_accounts set abalance = abalance + 1000 where aid <= 5000");
    primary.psql("insert into pgbench_history(tid, bid, aid, delta, mtime) values (1, 1, 1, 1000, now())");
    let at_end = snapshot(&primary);
    assert_eq!(
        at_end,
        Snapshot {
            history_rows: at_target.history_rows + 1,
            balance_sum: at_target.balance_sum + 5_000_000,
            marker_rows: 700,
            late_rows: 300,
        },
        "the writes after the target change every value"
    );
    let system_identifier = primary.psql("select system_identifier from pg_control_system()");
    lose(primary);

    // --- base-list: the table and the catalog record. ---
    let table = base_list(&repo_args, cwd, false);
    assert_eq!(listed_names(&table), [name.as_str()], "base-list: {}", table.stdout);
    let records = listed_records(&repo_args, cwd);
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    assert_eq!(record["name"], name.as_str(), "{record:#}");
    assert_eq!(record["timeline"], 1, "{record:#}");
    assert_eq!(record["pg_version"], 15, "{record:#}");
    assert_eq!(record["system_identifier"], system_identifier.as_str(), "{record:#}");
    for field in ["start_lsn", "stop_lsn", "started_at", "finished_at"] {
        assert!(record[field].as_str().is_some_and(|v| !v.is_empty()), "{field} in {record:#}");
    }
    let parts = record["archives"][0]["parts"].as_array().expect("archives[0].parts");
    assert!(parts.len() > 3, "2 MiB parts of a backup of tens of MB: {record:#}");
    for part in parts {
        let key = part["key"].as_str().expect("part key");
        assert!(key.starts_with(&format!("backups/{name}/base.tar.")), "{key}");
        assert!(repo.object_file(key).is_file(), "part {key} missing from the {}", repo.describe());
    }

    // --- Restore to the target time, into a directory base-fetch creates. ---
    let mut restored = Cluster::without_data_dir(&format!("{label}-base-restored"));
    let fetch = base_fetch(&repo_args, cwd, "LATEST", restored.data_dir(), &["--target-time", &target]);
    assert_eq!(fetch.code, Some(0), "base-fetch failed: {fetch:#?}");
    assert_eq!(fetch.stdout, format!("{name}\n"), "base-fetch prints the name of the backup it restored");
    assert!(fetch.stderr.contains("backup successfully verified"), "base-fetch's log: {}", fetch.stderr);
    let data = restored.data_dir();
    assert!(data.join("recovery.signal").is_file(), "no recovery.signal in {data:?}");
    let auto_conf = fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto_conf.contains(&format!("--config {}", config.display())),
        "restore_command reads the same configuration: {auto_conf}"
    );
    assert!(auto_conf.contains("recovery_target_time"), "postgresql.auto.conf: {auto_conf}");
    assert!(auto_conf.contains("recovery_target_action = 'promote'"), "postgresql.auto.conf: {auto_conf}");
    // PostgreSQL's own check of the restored files against the backup's manifest, before anything
    // else touches them.
    let verified = run(pg_command("pg_verifybackup", cwd).arg(data));
    assert_eq!(verified.code, Some(0), "pg_verifybackup {data:?}: {verified:#?}");
    assert!(verified.stdout.contains("backup successfully verified"), "{verified:#?}");

    restored.adopt_data_dir();
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    let recovered = snapshot(&restored);
    assert_eq!(recovered, at_target, "every value at the target time; after the target it was {at_end:?}");
    assert_eq!(recovered.late_rows, 0, "rows committed after the target are gone");
    assert_eq!(restored.checkpoint_timeline(), 2, "promoted onto a new timeline");
    let log = restored.log_contents();
    assert!(
        log.contains("recovery stopping before commit of transaction"),
        "recovery did not stop at the target time\n{}",
        restored.log_tail()
    );
    assert!(log.contains("restored log file \""), "no WAL came from the archive\n{}", restored.log_tail());
    assert!(!log.contains("wal-fetch: error"), "wal-fetch failed during recovery\n{}", restored.log_tail());
}

/// Archives what `cluster` has written, then loses it the way a machine is lost: crashed, its data
/// directory gone with it.
fn lose(mut cluster: Cluster) {
    let last_segment = cluster.switch_wal();
    cluster.wait_archived(&last_segment, WAIT_TIMEOUT);
    cluster.crash();
    let lost = cluster.data_dir().to_owned();
    drop(cluster);
    assert_absent(&lost);
}

/// A local repository whose configuration file adds `tables` (say `[base] part_size`).
fn local_config(store: &Scratch, repo: &Repository, file: &str, tables: &str) -> Vec<OsString> {
    let config = repo.write_config(store.path(), file, ConfigLines { tables, ..ConfigLines::default() });
    vec!["--config".into(), config.into()]
}

/// A cluster archiving into `repo`, which it has made a walship repository (with its identity
/// record) by the time this returns.
fn archiving_cluster(name: &str, repo: &Repository) -> Cluster {
    let mut cluster = Cluster::init(name, None);
    cluster.configure(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &repo.archive_command()),
    ]);
    cluster.start();
    let segment = cluster.switch_wal();
    cluster.wait_archived(&segment, WAIT_TIMEOUT);
    assert!(repo.object_file("repository.json").is_file(), "no repository.json in the {}", repo.describe());
    cluster
}

/// [`archiving_cluster`] with pgbench's tables at scale 1: about 55 MB to back up.
fn small_cluster(name: &str, repo: &Repository) -> Cluster {
    let cluster = archiving_cluster(name, repo);
    cluster.pgbench(&["-i", "-s", "1", "-q"]);
    cluster
}

/// base-push killed outright midway (SIGKILL: no chance to clean up) leaves objects but no catalog
/// record; base-list and base-fetch never see it, and the next base-push removes it.
#[test]
fn a_killed_base_push_leaves_no_backup_and_the_next_one_sweeps_it() {
    let store = Scratch::new("base-kill");
    let repo = Repository::local(&store);
    // Small parts and a slow stream (about a minute at full length): the first part is stored within
    // a second or two, and the kill lands long before the last.
    let slow = local_config(&store, &repo, "small-parts.toml", "[base]\npart_size = \"1MiB\"");
    let cluster = small_cluster("base-kill", &repo);
    let cwd = store.path();
    let before = base_list(&slow, cwd, false);
    assert_eq!(listed_names(&before), Vec::<String>::new());

    let mut push =
        Background::spawn("base-push at 1 MB/s", &mut base_push_command(&cluster, &slow, cwd, &["--max-rate=1M"]), cwd);
    let pg_basebackup = pg_basebackup_of(&mut push);
    let killed = wait_until("base-push has stored a part", || {
        assert!(push.is_running(), "base-push ended before the kill: {}", push.output_so_far());
        let parts: Vec<String> =
            repo.keys_under("backups/").into_iter().filter(|key| key.contains("/base.tar.")).collect();
        let name = parts.first()?.split('/').nth(1)?.to_owned();
        Some(name)
    });
    let out = push.signal_and_wait(libc::SIGKILL);
    assert_eq!(out.code, None, "killed: {out:#?}");
    assert!(out.stdout.is_empty(), "a killed base-push named no backup: {out:#?}");
    // pg_basebackup dies of the broken pipe; none of ours may stay behind.
    wait_until("the killed base-push's pg_basebackup has exited", || (!is_alive(pg_basebackup)).then_some(()));

    let left = repo.files_under(&format!("backups/{killed}/"));
    assert!(left.contains(&format!("backups/{killed}/owner.json")), "what the killed run left: {left:?}");
    assert!(left.contains(&format!("backups/{killed}/base.tar.000001")), "what the killed run left: {left:?}");
    assert!(!left.iter().any(|f| f.ends_with("backup_manifest")), "the killed run got to the end: {left:?}");
    assert_eq!(catalog(&repo), Vec::<String>::new(), "no catalog record for a backup cut short");
    assert_eq!(base_list(&slow, cwd, false).stdout, before.stdout, "base-list is unchanged");
    assert_eq!(listed_records(&slow, cwd), Vec::<serde_json::Value>::new());
    let nothing = store.path().join("nothing");
    let fetch = base_fetch(&slow, cwd, "LATEST", &nothing, &[]);
    assert_only_error(&fetch, "base-fetch", 1, &["holds no base backup"]);
    assert_absent(&nothing);
    let fetch = base_fetch(&slow, cwd, &killed, &nothing, &[]);
    assert_only_error(&fetch, "base-fetch", 1, &[&format!("no backup named {killed}")]);
    assert_absent(&nothing);

    // The next base-push (at full speed) sweeps the abandoned one before it starts.
    let (name, second) = base_push(&cluster, &slow, cwd, &[]);
    assert_ne!(name, killed);
    assert!(
        second.stderr.contains(&format!("removing backup {killed}, left incomplete by a base-push that was killed")),
        "base-push's log: {}",
        second.stderr
    );
    assert_eq!(repo.files_under(&format!("backups/{killed}/")), Vec::<String>::new());
    assert_absent(&repo.object_file(&format!("backups/{killed}")));
    assert_eq!(backup_dirs(&repo), [name.as_str()]);
    assert_eq!(catalog(&repo), [format!("catalog/{name}.json")]);
    assert_eq!(listed_names(&base_list(&slow, cwd, false)), [name]);
}

/// On S3, a base-push stopped by SIGTERM while a multipart upload is open aborts the upload, removes
/// every object it wrote and exits 11; the next one succeeds.
#[test]
fn a_terminated_base_push_on_s3_removes_its_objects_and_aborts_its_upload() {
    let store = Scratch::new("base-term");
    let repo = Repository::s3(&store, "walship-term", "db");
    let Repository::S3 { server, .. } = &repo else { unreachable!() };
    // One big part of the backup goes up as a multipart upload of 5 MiB pieces.
    let config = repo.write_config(
        store.path(),
        "multipart.toml",
        ConfigLines {
            backend: "part_size = \"5MiB\"",
            tables: "[base]\npart_size = \"64MiB\"",
            ..ConfigLines::default()
        },
    );
    let args: Vec<OsString> = vec!["--config".into(), config.into()];
    let cwd = store.path();
    let cluster = archiving_cluster("base-term", &repo);
    // About 20 MiB that does not compress, so that the stored part outgrows one piece.
    cluster.psql("create table noise(b bytea)");
    cluster.psql("alter table noise alter column b set storage external");
    cluster.psql(
        "insert into noise select (select decode(string_agg(md5(random()::text || g::text || i::text), ''), 'hex') \
         from generate_series(1, 4096) i) from generate_series(1, 320) g",
    );

    // Throttled: the 20 MiB take five seconds, and the signal comes after the first 5 MiB piece.
    let mut push =
        Background::spawn("base-push at 4 MB/s", &mut base_push_command(&cluster, &args, cwd, &["--max-rate=4M"]), cwd);
    let pg_basebackup = pg_basebackup_of(&mut push);
    wait_until("a piece of the multipart upload is stored", || {
        assert!(push.is_running(), "base-push ended before the signal: {}", push.output_so_far());
        (!server.stored_parts().is_empty()).then_some(())
    });
    let in_progress = backup_dirs(&repo);
    assert_eq!(in_progress.len(), 1, "one backup under way: {in_progress:?}");
    let out = push.signal_and_wait(libc::SIGTERM);
    assert_only_error(&out, "base-push", 11, &["interrupted by SIGTERM"]);
    wait_until("the stopped base-push's pg_basebackup has exited", || (!is_alive(pg_basebackup)).then_some(()));
    assert_eq!(repo.keys_under("backups/"), Vec::<String>::new(), "objects left in the {}", repo.describe());
    assert_eq!(catalog(&repo), Vec::<String>::new());
    assert_no_multipart_leftovers(server, "after base-push was stopped by SIGTERM");
    assert_eq!(listed_names(&base_list(&args, cwd, false)), Vec::<String>::new());

    let (name, _) = base_push(&cluster, &args, cwd, &[]);
    assert_eq!(catalog(&repo), [format!("catalog/{name}.json")]);
    assert_no_multipart_leftovers(server, "after a complete base-push");
    assert_eq!(listed_names(&base_list(&args, cwd, false)), [name]);
}

/// pg_basebackup that cannot connect: base-push says what it said, exit 10, and leaves nothing.
#[test]
fn a_failing_pg_basebackup_is_named_and_leaves_nothing() {
    let store = Scratch::new("base-nopg");
    let repo = Repository::local(&store);
    let cwd = store.path();
    // A socket directory where no server listens.
    let nowhere = store.mkdir("no-server-here");
    let mut cmd = base_command("base-push", &repo.cli_args(), cwd);
    cmd.env("PGHOST", &nowhere).env("PGPORT", "5432").args(["--", "--checkpoint=fast"]);
    let out = run(&mut cmd);
    let tool = pg_bin_dir().join("pg_basebackup");
    assert_only_error(
        &out,
        "base-push",
        10,
        &[&format!("base-push: error: {}: ", tool.display()), "connection to server", nowhere.to_str().unwrap()],
    );
    assert_eq!(repo.keys_under("backups/"), Vec::<String>::new());
    assert_eq!(files_below(&repo.object_file("backups")), Vec::<String>::new());
    assert_eq!(catalog(&repo), Vec::<String>::new());
}

/// The ways base-fetch refuses, all against one good backup: a directory that is not empty, a target
/// time older than every backup, names that are unknown or not names, and a damaged part. Nothing
/// usable is left behind by any of them, and nothing that was there is touched.
#[test]
fn base_fetch_refuses_damage_and_bad_requests_and_leaves_nothing() {
    let store = Scratch::new("base-refuse");
    let repo = Repository::local(&store);
    let args = repo.cli_args();
    let cwd = store.path();
    let cluster = small_cluster("base-refuse", &repo);
    let (name, _) = base_push(&cluster, &args, cwd, &[]);
    drop(cluster);

    // The backup is good: it restores, and PostgreSQL's own check agrees.
    let good = store.path().join("good");
    let fetch = base_fetch(&args, cwd, &name, &good, &[]);
    assert_eq!(fetch.code, Some(0), "{fetch:#?}");
    assert!(fetch.stderr.contains("backup successfully verified"), "{}", fetch.stderr);
    assert!(good.join("global/pg_control").is_file());
    fs::remove_dir_all(&good).unwrap();

    // A directory that is not empty: refused before anything is read, the file untouched.
    let occupied = store.mkdir("occupied");
    fs::write(occupied.join("keep.txt"), "someone's data\n").unwrap();
    let out = base_fetch(&args, cwd, "LATEST", &occupied, &[]);
    assert_only_error(&out, "base-fetch", 4, &["not empty", occupied.to_str().unwrap()]);
    assert_eq!(files_below(&occupied), ["keep.txt"]);
    assert_eq!(fs::read_to_string(occupied.join("keep.txt")).unwrap(), "someone's data\n");

    // A target older than every backup.
    let dir = store.path().join("restore");
    let out = base_fetch(&args, cwd, "LATEST", &dir, &["--target-time", "2000-01-01 00:00:00+00"]);
    assert_only_error(&out, "base-fetch", 1, &["no base backup can reach", &name]);
    assert_absent(&dir);
    let out = base_fetch(&args, cwd, &name, &dir, &["--target-time", "2000-01-01 00:00:00+00"]);
    assert_only_error(&out, "base-fetch", 1, &[&name, "cannot reach the target"]);
    assert_absent(&dir);

    // An unknown name, and something that is not a name at all.
    let out = base_fetch(&args, cwd, "20000101T000000Z", &dir, &[]);
    assert_only_error(&out, "base-fetch", 1, &["no backup named 20000101T000000Z"]);
    assert_absent(&dir);
    let out = base_fetch(&args, cwd, "../x", &dir, &[]);
    assert_only_error(&out, "base-fetch", 2, &["../x", "not a backup name"]);
    assert_absent(&dir);

    // Damage in the middle of the first part. Not a single bit: zstd's format has a few bits that
    // change nothing when flipped (the content still decodes to the recorded SHA-256, so such a
    // restore is rightly accepted); 64 inverted bytes always change something.
    let key = format!("backups/{name}/base.tar.000001");
    let part = repo.object_file(&key);
    let original = damage_middle(&part);
    let out = base_fetch(&args, cwd, "LATEST", &dir, &[]);
    assert_failed(&out, "base-fetch", 7, &[&key, "corrupt"]);
    assert_absent(&dir);
    // Into a directory that existed (empty): emptied again, nothing startable in it.
    let empty = store.mkdir("empty");
    let out = base_fetch(&args, cwd, &name, &empty, &[]);
    assert_failed(&out, "base-fetch", 7, &[&key, "corrupt"]);
    assert_eq!(files_below(&empty), Vec::<String>::new());
    assert!(fs::read_dir(&empty).unwrap().next().is_none(), "{empty:?} is left empty");
    // The part replaced by a well-formed object with other content: its own trailer agrees with it,
    // only the catalog record's SHA-256 knows better (its size is made to agree, so that the download
    // passes). Its first tar header no longer parses, so the tar reader trips long before the part's
    // end, where its checksums are checked: still the part is what is reported, not the tar stream
    // or the directory.
    let mut content = walship::codec::decode_all(&original).expect("the stored part decodes");
    content[0] ^= 0x01; // the first member's name: its header checksum no longer agrees
    let replacement = walship::codec::encode_all(&content, 1).unwrap();
    fs::write(&part, &replacement).unwrap();
    let record_file = repo.object_file(&format!("catalog/{name}.json"));
    let mut record: serde_json::Value = serde_json::from_slice(&fs::read(&record_file).unwrap()).unwrap();
    record["archives"][0]["parts"][0]["stored_bytes"] = replacement.len().into();
    fs::write(&record_file, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
    let out = base_fetch(&args, cwd, "LATEST", &dir, &[]);
    assert_failed(&out, "base-fetch", 7, &[&key, "corrupt", "the catalog record says"]);
    assert_absent(&dir);
}

/// A cluster with an extra tablespace: pg_basebackup cannot stream it, so base-push spools it
/// through `[base] spool_dir` and stores one archive per tablespace; base-fetch refuses to restore a
/// tablespace over a non-empty directory, restores it elsewhere with --tablespace-mapping, and the
/// restored server finds its rows there.
#[test]
fn a_cluster_with_a_tablespace_is_backed_up_and_restored_elsewhere() {
    let store = Scratch::new("base-tablespace");
    let repo = Repository::local(&store);
    let spool = store.mkdir("spool");
    let old_location = store.mkdir("tablespace");
    let new_location = store.path().join("tablespace-restored");
    let tables = format!("[base]\nspool_dir = \"{}\"", spool.display());
    let repo_args = local_config(&store, &repo, "tablespace.toml", &tables);
    let cwd = store.path();
    let cluster = archiving_cluster("base-ts", &repo);
    cluster.psql(&format!("create tablespace extra location '{}'", old_location.display()));
    cluster.psql("create table far(n int) tablespace extra");
    cluster.psql("insert into far select g from generate_series(1, 50000) g");

    let (name, push) = base_push(&cluster, &repo_args, cwd, &[]);
    assert!(push.stderr.contains("spooling the backup through"), "base-push's log: {}", push.stderr);
    assert_eq!(files_below(&spool), Vec::<String>::new(), "the spool is emptied after the backup");
    let records = listed_records(&repo_args, cwd);
    let archives = records[0]["archives"].as_array().expect("archives");
    assert_eq!(archives.len(), 2, "base.tar and the tablespace's archive: {archives:#?}");
    assert_eq!(archives[0]["name"], "base.tar");
    let tablespace = &archives[1]["tablespace"];
    assert_eq!(tablespace["location"], old_location.to_str().unwrap(), "{archives:#?}");
    assert_eq!(archives[1]["name"], format!("{}.tar", tablespace["oid"]), "{archives:#?}");

    cluster.psql("insert into far select g from generate_series(50001, 50100) g");
    lose(cluster);

    // The old tablespace directory still holds the lost cluster's files: restoring over it is refused
    // before anything is written.
    let mut restored = Cluster::without_data_dir("base-ts-restored");
    let refused = base_fetch(&repo_args, cwd, &name, restored.data_dir(), &[]);
    assert_failed(&refused, "base-fetch", 4, &[old_location.to_str().unwrap(), "not empty"]);
    assert_absent(restored.data_dir());

    let mapping = format!("{}={}", old_location.display(), new_location.display());
    let fetch = base_fetch(&repo_args, cwd, &name, restored.data_dir(), &["--tablespace-mapping", &mapping]);
    assert_eq!(fetch.code, Some(0), "base-fetch failed: {fetch:#?}");
    assert!(fetch.stderr.contains("backup successfully verified"), "base-fetch's log: {}", fetch.stderr);
    assert!(fs::read_dir(&new_location).unwrap().next().is_some(), "the tablespace was restored into {new_location:?}");
    restored.adopt_data_dir();
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(restored.count("select count(*) from far"), 50100, "rows in the tablespace, with the archived WAL");
    assert_eq!(
        restored.psql("select pg_tablespace_location(oid) from pg_tablespace where spcname = 'extra'"),
        new_location.to_str().unwrap()
    );
}

/// Arguments base-push and base-fetch cannot use are refused with exit 2 and one line, before
/// anything is created or any server is asked.
#[test]
fn bad_arguments_are_refused_before_anything_is_done() {
    let store = Scratch::new("base-args");
    let repo = Repository::local(&store);
    let (repo_args, cwd) = (repo.cli_args(), store.path());
    let dir = store.path().join("restored");
    for (extra, needle) in [
        (vec!["--target-time", "2026-11-22 08:00:00"], "no time zone"),
        (vec!["--target-time", "2026-13-45 08:00:00+00"], "not a timestamp"),
        (vec!["--target-lsn", "0/zz"], "target LSN"),
        (vec!["--target-xid", "12a"], "target xid"),
        (vec!["--target-name", "it's"], "target name"),
        (vec!["--target-timeline", "tomorrow"], "--target-timeline"),
        (vec!["--target-time", "2026-11-22 08:00:00+00", "--target-action", "explode"], "target action"),
        (vec!["--target-action", "promote"], "--target"),
        (vec!["--target-time", "2026-11-22 08:00:00+00", "--target-lsn", "0/1"], "cannot be used with"),
        (vec!["--standby", "--target-immediate"], "cannot be used with"),
        (vec!["--tablespace-mapping", "relative=/x"], "OLDDIR=NEWDIR"),
        (vec!["--tablespace-mapping", "/old"], "OLDDIR=NEWDIR"),
    ] {
        // Some are refused by the argument parser, some by base-fetch's own checks: one line either way.
        let out = base_fetch(&repo_args, cwd, "LATEST", &dir, &extra);
        assert_error(&out, 2, &["base-fetch: error: ", needle]);
        assert_absent(&dir);
    }
    for option in ["-Ft", "-D/x", "--pgdata=/x", "-Xstream", "-z", "--compress=9", "--no-manifest", "-R"] {
        let out = run(base_command("base-push", &repo_args, cwd).args(["--", option]));
        assert_only_error(&out, "base-push", 2, &[option, "set by base-push itself"]);
    }
    assert_eq!(files_below(&repo.object_file("")), Vec::<String>::new(), "nothing was written to the repository");
}
