//! wal-push never tells PostgreSQL that a segment is archived unless it is in the repository the
//! call would write to now, and never starts a new repository in place of the one the cluster's
//! history is in. Against a real PostgreSQL 15 (1 MiB segments), on local disk, on S3 (s3s-fs) and
//! over SSH (a real sshd):
//!
//! - A repository wiped and made anew at the same location, while look-ahead records of the old one
//!   exist: the next calls upload for real (the records name the old repository's id), and a
//!   recovery through that range returns every row.
//! - The repository's file system not mounted (a tmpfs, bind-mounted onto the location the cluster
//!   archives to, then unmounted): wal-push refuses (exit 6, one clear line in the server log) and
//!   writes nothing into the empty mount point; mounted again, archiving resumes with no gap.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use walship_tests::assertions::assert_ok;
use walship_tests::pg::{Cluster, WAIT_TIMEOUT, archive_command};
use walship_tests::repository::{Backend, ConfigLines, Repository};
use walship_tests::segments::{self, MIN_SEGMENT_SIZE, wal_key};
use walship_tests::{Scratch, run, wal_fetch, walship};

/// Where a data directory remembers its repositories (see `crates/walship/src/remembered.rs`).
const REMEMBERED: &str = "walship/repositories";
/// Rows per batch, and batches: each batch ends its segment, so the rows spread over several.
const ROWS: u64 = 100;
const BATCHES: u64 = 6;

/// Every segment name from `first` to `last`, both included, on the timeline of `first`.
fn segments_between(first: &str, last: &str) -> Vec<String> {
    segments::segments_between(first, last, MIN_SEGMENT_SIZE)
}

/// The segments PostgreSQL still has to archive, oldest first.
fn ready(cluster: &Cluster) -> Vec<String> {
    let status = cluster.data_dir().join("pg_wal/archive_status");
    let mut names: Vec<String> = fs::read_dir(status)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".ready").map(str::to_owned))
        .filter(|name| name.len() == 24)
        .collect();
    names.sort();
    names
}

fn look_ahead_records(cluster: &Cluster) -> Vec<String> {
    let Ok(entries) = fs::read_dir(cluster.data_dir().join("pg_wal/walship/pushed")) else { return Vec::new() };
    entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| !n.starts_with('.')).collect()
}

fn repository_id(repo: &Repository) -> String {
    let text = fs::read_to_string(repo.object_file("repository.json")).expect("repository.json");
    let identity: serde_json::Value = serde_json::from_str(&text).unwrap();
    identity["repository_id"].as_str().unwrap_or_else(|| panic!("no repository_id in {text}")).to_owned()
}

fn insert_batch(cluster: &Cluster, batch: u64) -> String {
    cluster.psql(&format!("insert into marks select {batch}, g from generate_series(1, {ROWS}) g"));
    cluster.switch_wal()
}

/// Removes every object of `repo` (and, on S3, s3s-fs's metadata of each), as an operator wiping it
/// would; the location itself stays, empty.
fn wipe(repo: &Repository) {
    if let Repository::S3 { server, bucket, prefix, .. } = repo {
        for key in repo.keys_under("") {
            let _ = fs::remove_file(server.metadata_file(bucket, &format!("{prefix}/{key}")));
        }
    }
    let root = repo.object_file("");
    for entry in fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) }.unwrap();
    }
    assert!(repo.keys_under("").is_empty(), "the wipe left objects in the {}", repo.describe());
}

// ---------------------------------------------------------------------------------------------------
// Item 4: a record answers only for the repository the call would write to now.
// ---------------------------------------------------------------------------------------------------

walship_tests::every_backend!(a_recreated_repository_gets_the_recorded_segments_uploaded_for_real);

/// The scenario: segments wait `.ready` (archiving paused), one wal-push call uploads them ahead
/// and leaves records, the repository is wiped and made anew at the same location (the deliberate
/// way: the cluster's memory of the old one removed too), then PostgreSQL archives the backlog.
/// Every segment must reach the new repository, and a recovery from a base backup taken before the
/// backlog, through the new repository, must return every row.
fn a_recreated_repository_gets_the_recorded_segments_uploaded_for_real(backend: Backend) {
    let label = backend.label();
    let store = &Scratch::new(&format!("push-recreated-{label}"));
    let repo = &Repository::new(backend, store);
    let config = repo.write_config(
        store.path(),
        "look-ahead.toml",
        ConfigLines { tables: "[push]\nlook_ahead = 16\nparallel = 2", ..ConfigLines::default() },
    );
    let config_args: Vec<OsString> = vec!["--config".into(), config.clone().into()];
    let archiving = walship_tests::pg::archive_command_with_config(&config);
    let backup = store.mkdir("base");

    // Archiving is off from the start (an empty archive_command keeps every segment .ready), so the
    // backup carries its own WAL (-X stream) and everything after it waits for the archiver.
    let mut primary = Cluster::start_archiving(&format!("{label}-recreated"), "", &[]);
    primary.psql("create table marks(batch int, n int)");
    primary.base_backup(&backup, &["-Fp", "-X", "stream"]);
    let mut last = String::new();
    for batch in 1..=BATCHES {
        last = insert_batch(&primary, batch);
    }
    let backlog = ready(&primary);
    assert!(backlog.len() >= BATCHES as usize, "expected a backlog of .ready segments, got {backlog:?}");

    // One call the way the archiver makes it: the oldest .ready, uploaded along with the next ones.
    let oldest = &backlog[0];
    let out = run(walship("wal-push")
        .current_dir(primary.data_dir())
        .args(&config_args)
        .arg(format!("pg_wal/{oldest}"))
        .arg(oldest));
    assert_ok(&out, "the first call, with look-ahead");
    let recorded = look_ahead_records(&primary);
    assert!(recorded.len() >= BATCHES as usize - 1, "look-ahead records {recorded:?} for {backlog:?}: {out:#?}");
    let old_id = repository_id(repo);

    // The repository is wiped and made anew; the operator also removes what the cluster remembers
    // of it (else wal-push refuses the empty location, see the mount test below). The records of
    // the old repository stay where they are: nobody thinks of pg_wal/walship.
    wipe(repo);
    fs::remove_dir_all(primary.data_dir().join(REMEMBERED)).unwrap();
    assert_eq!(look_ahead_records(&primary).len(), recorded.len());

    primary.psql(&format!("alter system set archive_command = {}", walship_tests::pg::conf_quote(&archiving)));
    primary.psql("select pg_reload_conf()");
    primary.wait_archived(&last, WAIT_TIMEOUT);
    let new_id = repository_id(repo);
    assert_ne!(new_id, old_id, "a repository made anew has a new id");
    let missing: Vec<String> = segments_between(oldest, &last)
        .into_iter()
        .filter(|name| !repo.object_file(&wal_key(name)).is_file())
        .collect();
    assert!(
        missing.is_empty(),
        "PostgreSQL was told these segments were archived, but the new repository lacks them (records of the \
         old repository answered): {missing:?}\n{}\n{}",
        repo.describe(),
        primary.log_tail()
    );
    primary.crash();
    drop(primary);

    // A recovery through the whole range, from the new repository: every row comes back.
    let mut restored = Cluster::restore(
        &format!("{label}-recreated-pitr"),
        &backup,
        &[("restore_command", &repo.restore_command()), ("recovery_target_action", "promote")],
    );
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    let rows: u64 = restored.psql("select count(*) from marks").parse().unwrap();
    assert_eq!(rows, ROWS * BATCHES, "rows after recovery through the new repository\n{}", restored.log_tail());
    assert!(
        restored.log_contents().contains(&format!("restored log file \"{last}\" from archive")),
        "the last segment did not come from the archive\n{}",
        restored.log_tail()
    );
}

// ---------------------------------------------------------------------------------------------------
// Item 5: never a new repository in place of the one the cluster archived into.
// ---------------------------------------------------------------------------------------------------

/// Mounts made by a test; unmounted (innermost first) when dropped, so a failing test leaves none.
struct Mounts {
    points: Vec<PathBuf>,
}

impl Mounts {
    fn mount(&mut self, args: &[&std::ffi::OsStr], point: &Path) {
        let out = run(Command::new("mount").args(args).arg(point));
        assert_eq!(out.code, Some(0), "mount {args:?} {point:?}: {out:#?}");
        self.points.push(point.to_owned());
    }

    fn unmount(&mut self, point: &Path) {
        let out = run(Command::new("umount").arg(point));
        assert_eq!(out.code, Some(0), "umount {point:?}: {out:#?}");
        self.points.retain(|p| p != point);
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for point in self.points.iter().rev() {
            // Lazily, should something still use it: never leave a mount behind.
            let _ = run(Command::new("umount").arg("-l").arg(point));
        }
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Waits until the server log holds a line containing `needle`; returns that line.
fn wait_for_log_line(cluster: &Cluster, needle: &str) -> String {
    let started = Instant::now();
    loop {
        if let Some(line) = cluster.log_contents().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(started.elapsed() < WAIT_TIMEOUT, "no log line with {needle:?}\n{}", cluster.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the server log shows wal-push's refusal; fails at once if wal-push wrote into the
/// empty mount point `location` instead.
fn wait_for_refusal(cluster: &Cluster, location: &Path) -> String {
    let started = Instant::now();
    loop {
        if let Some(line) = cluster.log_contents().lines().find(|l| l.contains("wal-push: error:")) {
            return line.to_owned();
        }
        let written = files_in(location);
        assert!(
            written.is_empty(),
            "wal-push started a new repository in the empty mount point: {written:?}\n{}",
            cluster.log_tail()
        );
        assert!(started.elapsed() < WAIT_TIMEOUT, "no refusal in the server log\n{}", cluster.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The repository's file system is a tmpfs (holding the repository directory), bind-mounted onto
/// the location the cluster archives to; the bind mount goes away (tmpfs itself would lose its
/// content on unmount, a real disk or NFS export would not), so the location is an empty directory
/// the server user may write to, exactly what an unmounted mount point looks like.
#[test]
fn an_unmounted_repository_is_refused_and_archiving_resumes_without_a_gap() {
    let store = Scratch::new("push-mount");
    let mut mounts = Mounts { points: Vec::new() };
    let holder = store.mkdir("holder");
    mounts.mount(
        &["-t".as_ref(), "tmpfs".as_ref(), "-o".as_ref(), "size=64m,mode=0755".as_ref(), "tmpfs".as_ref()],
        &holder,
    );
    walship_tests::chown_to_server_user(&holder);
    let disk = store.mkdir("holder/repo");
    let location = store.mkdir("mnt");
    mounts.mount(&["--bind".as_ref(), disk.as_os_str()], &location);

    // Declared after the mounts, so it is dropped (stopped) first.
    let mut primary = Cluster::start_archiving("mount", &archive_command(&location), &[]);
    primary.psql("create table marks(batch int, n int)");
    let first = insert_batch(&primary, 1);
    primary.wait_archived(&first, WAIT_TIMEOUT);
    let remembered = primary.data_dir().join(REMEMBERED);
    let memory = files_in(&remembered);
    assert_eq!(memory.len(), 1, "one remembered repository: {memory:?}");
    let id = fs::read_to_string(disk.join("repository.json")).unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&id).unwrap()["repository_id"].as_str().unwrap().to_owned();
    let memory_text = fs::read_to_string(remembered.join(&memory[0])).unwrap();
    assert!(memory_text.contains(&id), "{memory_text}");
    // pg_basebackup copies it, so a restored copy of the cluster knows the repository too.
    let backup = store.mkdir("base");
    primary.base_backup(&backup, &["-Fp", "-X", "stream"]);
    assert_eq!(fs::read_to_string(backup.join(REMEMBERED).join(&memory[0])).unwrap(), memory_text);

    // The file system goes away. PostgreSQL's next calls are refused, and nothing lands in the
    // empty mount point.
    mounts.unmount(&location);
    assert!(files_in(&location).is_empty());
    let during = insert_batch(&primary, 2);
    let refused = wait_for_refusal(&primary, &location);
    eprintln!("the refusal, as the server log shows it: {refused}");
    for part in ["repository.json", &id, "not mounted", "nothing was written", &memory[0], "(exit 6)"] {
        assert!(refused.contains(part), "{part:?} missing in the refusal: {refused}");
    }
    wait_for_log_line(&primary, "archive command failed with exit code 6");
    assert!(files_in(&location).is_empty(), "wal-push wrote into the empty mount point: {:?}", files_in(&location));
    let failed: u64 = primary.psql("select failed_count from pg_stat_archiver").parse().unwrap();
    assert!(failed > 0);

    // Mounted again: archiving resumes where it stopped.
    mounts.mount(&["--bind".as_ref(), disk.as_os_str()], &location);
    primary.wait_archived(&during, WAIT_TIMEOUT);
    let last = insert_batch(&primary, 3);
    primary.wait_archived(&last, WAIT_TIMEOUT);

    // No gap: every segment from the first one archived to the last comes back from the repository.
    let first_archived = files_in(&location.join(&wal_key(&first)[..20])).into_iter().next().unwrap();
    let fetched = store.mkdir("fetched");
    for name in segments_between(&first_archived, &last) {
        let out = wal_fetch(&location, &fetched, &name, &name);
        assert_ok(&out, &format!("wal-fetch {name} (a gap in the archive?)"));
        fs::remove_file(fetched.join(&name)).unwrap();
    }
    primary.crash();
}

// ---------------------------------------------------------------------------------------------------
// Item 8: one deadline per call, as PostgreSQL's shutdown sees it.
// ---------------------------------------------------------------------------------------------------

/// The store is unreachable (an S3 endpoint on a port nobody listens on) and a backlog of .ready
/// segments waits, more than one upload at a time: `pg_ctl stop` waits for the archiver. What
/// PostgreSQL 15 does then (seen in this test's server log): after "received fast shutdown
/// request" the archiver finishes the call under way, then makes two rounds of three tries at the
/// oldest segment, a second apart ("failed too many times, will try again later" after each
/// round), and only then is the server shut down: six wal-push calls. With one deadline per call
/// (3 s here) the stop takes about 20 s; with a deadline per queued upload each call took 17 of
/// them (51 s), and the stop ran into pg_ctl's timeout ("server does not shut down").
#[test]
fn a_dead_endpoint_does_not_hold_pg_ctl_stop_for_many_deadlines() {
    const DEADLINE_SECS: u64 = 3;
    let store = Scratch::new("push-dead");
    let server = walship_tests::s3::S3Server::start();
    let dead = format!("http://127.0.0.1:{}", walship_tests::s3::free_port());
    let top = format!("deadline_secs = {DEADLINE_SECS}");
    let text = server.config_text("s3://walship-test/db1", &dead, &top, "connect_timeout_secs = 2");
    let config = walship_tests::s3::write_config_file(
        store.path(),
        "dead.toml",
        &format!("{text}[push]\nlook_ahead = 16\nparallel = 1\n"),
    );
    let mut primary = Cluster::start_archiving("dead", "", &[]);
    primary.psql("create table marks(batch int, n int)");
    for batch in 1..=17 {
        insert_batch(&primary, batch);
    }
    assert!(ready(&primary).len() >= 17, "{:?}", ready(&primary));
    let archiving = walship_tests::pg::archive_command_with_config(&config);
    primary.psql(&format!("alter system set archive_command = {}", walship_tests::pg::conf_quote(&archiving)));
    primary.psql("select pg_reload_conf()");
    wait_for_log_line(&primary, "archive command failed with exit code 8");

    let started = Instant::now();
    primary.stop();
    let took = started.elapsed();
    let log = primary.log_contents();
    let calls = log.lines().filter(|l| l.contains("archive command failed with exit code 8")).count();
    eprintln!("pg_ctl stop took {took:?}; {calls} failed archive_command calls in the log");
    // Six calls, each one deadline plus walship-cli's cleanup grace (10 s) at most, and the pauses.
    let bound = Duration::from_secs(6 * (DEADLINE_SECS + 10) + 10);
    assert!(took < bound, "pg_ctl stop took {took:?} with deadline_secs = {DEADLINE_SECS}\n{}", primary.log_tail());
    let gave_up = log.lines().find(|l| l.contains("wal-push: error:")).unwrap_or_default().to_owned();
    assert!(gave_up.contains(&format!("gave up after {DEADLINE_SECS} s")), "{gave_up}");
}
