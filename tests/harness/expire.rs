//! Running base-expire the way cron does, and reading what it did and what it left: the expire
//! suites (tests/expire.rs, tests/expire_safety.rs) judge a run by its JSON report, its `--dry-run`
//! listing and the objects left in the repository, and a kept backup by restoring it.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;

use walship::wal::WalFileName;

use crate::backups::{base_command, base_fetch};
use crate::pg::{Cluster, WAIT_TIMEOUT};
use crate::repository::{Backend, ConfigLines, Repository};
use crate::{Output, Scratch, run};

/// The test clusters' segments are 1 MiB.
pub const SEGMENT_SIZE: u32 = 1 << 20;

/// A repository of kind `backend`, the configuration file that names it (with `lines`), and the
/// scratch directory commands run in.
pub struct ExpireSetup {
    /// The scratch directory (it also holds the configuration file and a local repository).
    pub store: Scratch,
    /// The repository.
    pub repo: Repository,
    /// `--config FILE`, selecting the repository.
    pub repo_args: Vec<OsString>,
}

impl ExpireSetup {
    /// A new repository for `scenario` (which names the scratch directory) on `backend`.
    pub fn new(backend: Backend, scenario: &str, lines: ConfigLines) -> ExpireSetup {
        let store = Scratch::new(&format!("expire-{scenario}-{}", backend.label()));
        let repo = Repository::new(backend, &store);
        let config = repo.write_config(store.path(), "expire.toml", lines);
        ExpireSetup { repo_args: vec!["--config".into(), config.into()], store, repo }
    }
}

/// The base-expire command on the repository `repo_args` selects, with `args`, not yet run (for
/// running it in the background, or with a failpoint set).
pub fn base_expire_command(repo_args: &[OsString], cwd: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = base_command("base-expire", repo_args, cwd);
    cmd.args(args);
    cmd
}

/// Runs base-expire with `args` to its end.
pub fn base_expire(repo_args: &[OsString], cwd: &Path, args: &[&str]) -> Output {
    run(&mut base_expire_command(repo_args, cwd, args))
}

/// The JSON report of a run that succeeded (`--json` is added).
#[track_caller]
pub fn expire_json(repo_args: &[OsString], cwd: &Path, args: &[&str]) -> serde_json::Value {
    let out = base_expire(repo_args, cwd, &[args, &["--json"]].concat());
    assert_eq!(out.code, Some(0), "base-expire {args:?}: {out:#?}");
    report_of(&out)
}

/// The JSON report a `--json` run printed.
#[track_caller]
pub fn report_of(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("base-expire --json: {e}: {out:#?}"))
}

/// What `--dry-run` lists: the keys it would delete (each line `BYTES<TAB>KEY`).
#[track_caller]
pub fn dry_run(repo_args: &[OsString], cwd: &Path, args: &[&str]) -> BTreeSet<String> {
    let out = base_expire(repo_args, cwd, &[args, &["--dry-run"]].concat());
    assert_eq!(out.code, Some(0), "base-expire --dry-run {args:?}: {out:#?}");
    out.stdout
        .lines()
        .map(|line| {
            let (bytes, key) = line.split_once('\t').unwrap_or_else(|| panic!("not BYTES<TAB>KEY: {line:?}"));
            assert!(bytes.parse::<u64>().is_ok(), "{line:?}");
            key.to_owned()
        })
        .collect()
}

/// The backup names in a report's list `field` (`kept`, `expired`).
pub fn names_in(report: &serde_json::Value, field: &str) -> Vec<String> {
    let list = report[field].as_array().unwrap_or_else(|| panic!("{field} in {report:#}"));
    list.iter().map(|b| b["name"].as_str().expect("name").to_owned()).collect()
}

/// The names in a report's `resumed` list (removals an earlier run was cut off in).
pub fn resumed_in(report: &serde_json::Value) -> Vec<String> {
    let list = report["resumed"].as_array().unwrap_or_else(|| panic!("resumed in {report:#}"));
    list.iter().map(|name| name.as_str().expect("a name").to_owned()).collect()
}

/// The catalog records base-list shows, oldest first.
#[track_caller]
pub fn listed(repo_args: &[OsString], cwd: &Path) -> Vec<serde_json::Value> {
    let out = run(base_command("base-list", repo_args, cwd).arg("--json"));
    assert_eq!(out.code, Some(0), "base-list: {out:#?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("base-list --json: {e}: {}", out.stdout))
}

/// The names base-list shows, oldest first.
pub fn listed_names(repo_args: &[OsString], cwd: &Path) -> Vec<String> {
    listed(repo_args, cwd).iter().map(|r| r["name"].as_str().expect("name").to_owned()).collect()
}

/// A backup's catalog record, from base-list --json.
#[track_caller]
pub fn record(repo_args: &[OsString], cwd: &Path, name: &str) -> serde_json::Value {
    let records = listed(repo_args, cwd);
    records.into_iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("{name} is not listed"))
}

/// The segment number of a WAL file name (or of a WAL key's last part); `None` for history files.
pub fn segment_number(name: &str) -> Option<u64> {
    let name = WalFileName::parse(name.rsplit('/').next().unwrap_or(name)).ok()?;
    name.timeline_and_log()?;
    name.segment_number(SEGMENT_SIZE)
}

/// The number of the segment a backup's record says it starts in.
pub fn start_segment(record: &serde_json::Value) -> u64 {
    segment_number(record["start_wal_file"].as_str().expect("start_wal_file")).expect("a segment name")
}

/// Every object key in the repository.
pub fn all_keys(repo: &Repository) -> BTreeSet<String> {
    repo.keys_under("").into_iter().collect()
}

/// The WAL keys (history files aside) of segments numbered `from` or later.
pub fn wal_from(keys: &BTreeSet<String>, from: u64) -> BTreeSet<String> {
    keys.iter().filter(|k| k.starts_with("wal/") && segment_number(k).is_some_and(|s| s >= from)).cloned().collect()
}

/// A primary with 1 MiB segments archiving into `repo`, started, with a table `t` of numbered batches.
pub fn primary(name: &str, repo: &Repository) -> Cluster {
    let mut cluster = Cluster::init(name, Some(1));
    cluster.configure(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &repo.archive_command()),
        ("wal_keep_size", "256MB"),
    ]);
    cluster.start();
    cluster.psql("create table t(batch int, n int)");
    cluster
}

/// Inserts `rows` rows of batch `batch` into `t` and closes the segment, so that every batch lies in
/// WAL of its own.
pub fn insert_batch(cluster: &Cluster, batch: i64, rows: i64) {
    cluster.psql(&format!("insert into t select {batch}, g from generate_series(1, {rows}) g"));
    cluster.switch_wal();
}

/// Archives everything `cluster` wrote and stops it: the repository is then still.
pub fn archive_and_stop(mut cluster: Cluster) {
    let last = cluster.switch_wal();
    cluster.wait_archived(&last, WAIT_TIMEOUT);
    cluster.stop();
}

/// A failover: a standby `name` of `old` replays everything, `old` archives what it wrote and stops,
/// and the standby is promoted onto the next timeline. Returns the new primary.
pub fn promoted_standby(old: Cluster, name: &str) -> Cluster {
    let mut standby = Cluster::standby_of(&old, name);
    standby.start();
    standby.wait_replayed(&old);
    archive_and_stop(old);
    assert_eq!(standby.psql("select pg_promote()"), "t");
    standby.wait_recovered(WAIT_TIMEOUT);
    standby
}

/// Restores backup `name` into a new cluster `label` with `extra` base-fetch flags, recovers it to
/// the end of the archive (or the target `extra` gives) and returns what `sql` (a count) says there.
#[track_caller]
pub fn restored_count(repo_args: &[OsString], cwd: &Path, label: &str, name: &str, extra: &[&str], sql: &str) -> i64 {
    let mut restored = Cluster::without_data_dir(label);
    let fetch = base_fetch(repo_args, cwd, name, restored.data_dir(), extra);
    assert_eq!(fetch.code, Some(0), "base-fetch {name} {extra:?}: {fetch:#?}");
    restored.adopt_data_dir();
    // The restored copy must not archive into the repository under test.
    restored.configure(&[("archive_mode", "off")]);
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    let log = restored.log_contents();
    assert!(!log.contains("wal-fetch: error"), "wal-fetch failed during recovery\n{}", restored.log_tail());
    let count = restored.psql(sql);
    count.parse().unwrap_or_else(|_| panic!("{sql}: {count:?}"))
}

/// Rewrites the catalog record of backup `child` into that of an incremental backup on top of
/// `parent` (type, parent and the record format an incremental one is written with): a chain made of
/// real full backups, for what reads only records and parts (base-expire, base-verify's integrity
/// check). `parent = None` leaves the type incremental with no parent named.
#[track_caller]
pub fn make_incremental(repo: &Repository, child: &str, parent: Option<&str>) {
    let file = repo.object_file(&format!("catalog/{child}.json"));
    let text = std::fs::read(&file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
    let mut record: serde_json::Value = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{file:?}: {e}"));
    record["backup_type"] = "incremental".into();
    record["parent"] = parent.map_or(serde_json::Value::Null, Into::into);
    record["format_version"] = walship::base::INCREMENTAL_RECORD_FORMAT.into();
    std::fs::write(&file, serde_json::to_vec_pretty(&record).unwrap()).unwrap_or_else(|e| panic!("{file:?}: {e}"));
}

/// The key of the claim a base-push taking incremental backup `child` on top of `parent` writes.
pub fn claim_key(parent: &str, child: &str) -> String {
    walship::base::catalog::needed_by_key(parent, child)
}

/// Writes the claim on `parent` for `child` through the repository's own store, as a running
/// base-push --incremental does before it reads the parent's manifest.
#[track_caller]
pub fn write_claim(repo: &Repository, parent: &str, child: &str) {
    let key = claim_key(parent, child);
    let store = repo.open_storage();
    let body = format!("{{\"name\": \"{parent}\", \"at\": \"now\", \"by\": \"base-push {child}\"}}\n");
    store
        .run(async {
            let mut writer = store.storage().create(&key, walship::storage::PutOptions::default()).await?;
            writer.write(bytes::Bytes::from(body)).await?;
            writer.commit().await
        })
        .unwrap_or_else(|e| panic!("write {key}: {e}"));
}

/// A kept backup's entry in a report's `kept` list.
#[track_caller]
pub fn kept_entry<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    let kept = report["kept"].as_array().unwrap_or_else(|| panic!("kept in {report:#}"));
    kept.iter().find(|b| b["name"] == name).unwrap_or_else(|| panic!("{name} is not kept: {report:#}"))
}
