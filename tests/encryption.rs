//! Client-side encryption end to end (issue 16), against a real PostgreSQL 15 whose archive_command
//! names a configuration file with an `[encryption]` table:
//!
//! - no stored object (WAL, history, `.backup`, base-backup parts, manifest) holds a row in the
//!   clear, where a plain repository does;
//! - a flipped byte anywhere in a stored object is refused as damage (7; 207 from wal-fetch, which
//!   exits as restore_command does unless it runs on a standby) and nothing is handed over;
//! - a wrong or missing key and a repository whose encryption the configuration does not match are
//!   exit 14 (214 from wal-fetch), and nothing is written;
//! - the host that archives holds public keys only, and still never answers "already archived" about
//!   a damaged copy;
//! - key rotation, encrypting an existing repository, and passphrase mode, each restored to a target
//!   time with rows counted exactly;
//! - key files other users can read, and short passphrases, are refused; no output of any command
//!   here (nor any server log) shows a private key or a passphrase.
//!
//! Each scenario shares one cluster between the checks that do not disturb each other.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use walship_tests::assertions::{assert_absent, assert_no_temp_files, assert_one_line};
use walship_tests::backups::{base_command, base_push_command};
use walship_tests::encryption::{
    Damage, assert_no_secret, command, config_args, config_with, files_containing, flip_byte, framing_key_ids,
    holds_nothing, places_to_damage, put_back, random_marker, remember_secret, rewrite_config, run, set_byte,
    stage_byte,
};
use walship_tests::keys::{KeyPair, encryption_table};
use walship_tests::pg::{Cluster, WAIT_TIMEOUT, archive_command_with_config};
use walship_tests::repository::{Backend, Repository};
use walship_tests::segments::wal_key;
use walship_tests::{Output, Scratch, chown_to_server_user, wait_until};

/// Where wal-fetch puts a file, relative to the data directory it runs from.
const RECOVERYXLOG: &str = "pg_wal/RECOVERYXLOG";

/// What a scenario's commands need: the scratch directory (configuration files, keys, the working
/// directory of every command) and the repository.
struct Setup {
    store: Scratch,
    repo: Repository,
    /// A data directory stand-in for wal-fetch by hand (no standby.signal: it exits as during a
    /// point-in-time recovery).
    fetch_dir: PathBuf,
    keys: PathBuf,
}

impl Setup {
    fn new(backend: Backend, label: &str) -> Setup {
        let store = Scratch::new(&format!("enc-{label}-{}", backend.label()));
        let repo = Repository::new(backend, &store);
        let fetch_dir = store.mkdir("fetch");
        store.mkdir("fetch/pg_wal");
        let keys = store.mkdir("keys");
        Setup { store, repo, fetch_dir, keys }
    }

    fn key(&self, name: &str) -> KeyPair {
        KeyPair::generate(&self.keys, name)
    }

    /// A configuration file `name` for the repository with `tables`.
    fn config(&self, name: &str, tables: &str) -> PathBuf {
        config_with(&self.repo, self.store.path(), name, tables)
    }

    fn cwd(&self) -> &Path {
        self.store.path()
    }

    /// `wal-fetch --config CONFIG NAME pg_wal/RECOVERYXLOG`, run as restore_command runs it.
    fn wal_fetch(&self, config: &Path, name: &str) -> Output {
        let mut cmd = command(&self.repo, "wal-fetch", &self.fetch_dir);
        run(cmd.args(config_args(config)).arg(name).arg(RECOVERYXLOG))
    }

    /// `wal-push --config CONFIG FILE NAME` from `cwd`.
    fn wal_push(&self, config: &Path, cwd: &Path, file: &Path, name: &str) -> Output {
        let mut cmd = command(&self.repo, "wal-push", cwd);
        run(cmd.args(config_args(config)).arg(file).arg(name))
    }

    /// Fetches `name` with `config` and returns its bytes, leaving nothing behind.
    #[track_caller]
    fn fetched(&self, config: &Path, name: &str) -> Vec<u8> {
        let out = self.wal_fetch(config, name);
        assert_eq!(out.code, Some(0), "wal-fetch {name}: {out:#?}");
        let path = self.fetch_dir.join(RECOVERYXLOG);
        let bytes = fs::read(&path).unwrap();
        fs::remove_file(&path).unwrap();
        bytes
    }

    fn base_push(&self, cluster: &Cluster, config: &Path) -> Output {
        run(&mut base_push_command(cluster, &config_args(config), self.cwd(), &[]))
    }

    /// `base-fetch --config CONFIG BACKUP DIR EXTRA`.
    fn base_fetch(&self, config: &Path, backup: &str, dir: &Path, extra: &[&str]) -> Output {
        let mut cmd = base_command("base-fetch", &config_args(config), self.cwd());
        if let Some(server) = self.repo.ssh_server() {
            cmd.env("HOME", server.client_home());
        }
        run(cmd.arg(backup).arg(dir).args(extra))
    }

    /// Every file the repository holds, with its size: to show a command wrote nothing.
    fn snapshot(&self) -> Vec<(String, u64)> {
        let files = self.repo.files_under("");
        files.into_iter().map(|f| (f.clone(), fs::metadata(self.repo.object_file(&f)).map_or(0, |m| m.len()))).collect()
    }
}

/// A cluster with 1 MiB segments archiving with the configuration file `config`, with a `marks`
/// table.
fn archiving_cluster(name: &str, config: &Path) -> Cluster {
    let cluster = Cluster::start_archiving(name, &archive_command_with_config(config), &[("wal_keep_size", "64MB")]);
    cluster.psql("create table marks(batch text, n int, note text)");
    cluster
}

fn add(cluster: &Cluster, batch: &str, rows: u32) {
    cluster.psql(&format!("insert into marks select '{batch}', g, null from generate_series(1, {rows}) g"));
}

/// Rows per batch, `batch:count` sorted by batch.
fn batches(cluster: &Cluster) -> String {
    cluster.psql(
        "select coalesce(string_agg(batch || ':' || n, ' ' order by batch), '') \
         from (select batch, count(*) n from marks group by batch) b",
    )
}

/// Switches to a new WAL file and waits until the one completed is archived; returns its name.
fn archive_all(cluster: &Cluster) -> String {
    let segment = cluster.switch_wal();
    cluster.wait_archived(&segment, WAIT_TIMEOUT);
    segment
}

/// The server's current time as `--target-time` takes it, with a clear gap on either side so that
/// the target does not depend on clock granularity.
fn target_time(cluster: &Cluster) -> String {
    std::thread::sleep(Duration::from_millis(1100));
    let now = cluster.psql("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'");
    std::thread::sleep(Duration::from_millis(1100));
    now
}

/// The name of the backup base-push took, from its output.
#[track_caller]
fn pushed_backup(out: &Output) -> String {
    assert_eq!(out.code, Some(0), "base-push: {out:#?}");
    out.stdout.trim().to_owned()
}

/// Panics unless `out` failed with `code`, one line on stderr, naming every needle.
#[track_caller]
fn assert_refused(out: &Output, code: i32, needles: &[&str]) {
    assert_eq!(out.code, Some(code), "exit code: {out:#?}");
    assert_one_line(out);
    for needle in needles {
        assert!(out.stderr.contains(needle), "stderr should mention {needle:?}: {:?}", out.stderr);
    }
}

/// The WAL objects (segments, history, `.backup`) in the repository, as keys.
fn wal_objects(repo: &Repository) -> Vec<String> {
    repo.keys_under("wal/")
}

/// Restores `backup` with base-fetch into a new cluster's data directory, with `extra` (a target),
/// and starts it; panics unless base-fetch succeeded.
#[track_caller]
fn restore(s: &Setup, name: &str, config: &Path, backup: &str, extra: &[&str]) -> Cluster {
    let cluster = Cluster::without_data_dir(name);
    let out = s.base_fetch(config, backup, cluster.data_dir(), extra);
    assert_eq!(out.code, Some(0), "base-fetch {backup}: {out:#?}");
    cluster.adopt_data_dir();
    cluster
}

/// Waits until the postmaster has exited by itself, or recovery has ended (which the caller then
/// finds in the log, without waiting for a stop that would never come).
fn wait_stopped_or_promoted(cluster: &Cluster) {
    wait_until(&format!("cluster {} has stopped or ended recovery", cluster.name()), || {
        let promoted = cluster.log_contents().contains("archive recovery complete");
        (!cluster.is_running() || promoted).then_some(())
    });
}

/// Panics if the cluster's server log shows key material.
fn assert_log_clean(cluster: &Cluster) {
    assert_no_secret(&format!("the server log of {}", cluster.name()), &cluster.log_contents());
}

walship_tests::every_backend!(stored_objects_are_opaque_and_damage_or_a_wrong_key_is_refused);

/// Items 1, 2, 3 and 7 of issue 16 on one cluster that archives with public keys only.
fn stored_objects_are_opaque_and_damage_or_a_wrong_key_is_refused(backend: Backend) {
    let s = Setup::new(backend, "opaque");
    let (a, b) = (s.key("a"), s.key("b"));
    // The archive host: recipients, no identity.
    let archiving = s.config("archive.toml", &encryption_table(&[&a], &[], ""));
    let reading = s.config("read.toml", &encryption_table(&[&a], &[&a], ""));
    let mut primary = archiving_cluster(&format!("{}-opaque", backend.label()), &archiving);

    let marker = random_marker();
    primary.psql(&format!("insert into marks values ('secret', 1, '{marker}')"));
    let segment = archive_all(&primary);
    let backup = pushed_backup(&s.base_push(&primary, &archiving));
    archive_all(&primary);
    // The archiver may take the backup's .backup file after the segment archive_all waited for.
    wait_until("the .backup file is archived", || {
        wal_objects(&s.repo).iter().any(|k| k.ends_with(".backup")).then_some(())
    });
    no_plaintext_anywhere(&s, &backup, &marker);
    damage_is_refused(&s, &reading, &segment, &backup);
    keyless_host_compares_by_seal(&s, &archiving, &reading, &segment);
    wrong_or_missing_keys_are_refused(&s, &a, &b, &segment);

    // The control, and the mixing checks that need a plain repository: a plain one beside it.
    let store = Scratch::new(&format!("enc-plain-{}", backend.label()));
    let plain = Plain { repo: Repository::new(backend, &store), store };
    let plain_config = config_with(&plain.repo, plain.store.path(), "plain.toml", "");
    primary.psql(&format!(
        "alter system set archive_command = {}",
        walship_tests::pg::conf_quote(&archive_command_with_config(&plain_config))
    ));
    primary.psql("select pg_reload_conf()");
    primary.psql(&format!("insert into marks values ('secret', 2, '{marker}')"));
    let last = archive_all(&primary);
    let found = files_containing(&plain.repo, marker.as_bytes());
    assert!(!found.is_empty(), "the plain repository holds the row in the clear (so the search is real)");
    mixing_is_refused(&s, &primary, &plain, &a, [&segment, &last]);
    assert_log_clean(&primary);
    primary.stop();
}

/// Item 1: the marker row is in no file the repository holds, and those files cover every kind of
/// object.
fn no_plaintext_anywhere(s: &Setup, backup: &str, marker: &str) {
    let files = s.repo.files_under("");
    let objects = wal_objects(&s.repo);
    assert!(objects.iter().any(|k| k.ends_with(".backup")), "a .backup object among {objects:?}");
    assert!(objects.iter().filter(|k| !k.ends_with(".backup")).count() >= 2, "segments among {objects:?}");
    let parts = s.repo.keys_under(&format!("backups/{backup}/base.tar."));
    assert!(!parts.is_empty(), "base-backup parts among {files:?}");
    let manifest = format!("backups/{backup}/backup_manifest");
    assert!(s.repo.object_file(&manifest).is_file(), "{manifest} among {files:?}");
    let found = files_containing(&s.repo, marker.as_bytes());
    assert!(found.is_empty(), "the row is in the clear in {found:?} of the {}", s.repo.describe());
    for key in objects.iter().chain(&parts).chain([&manifest]) {
        assert_eq!(stage_byte(&s.repo.object_file(key)), 2, "{key} is encrypted");
    }
}

/// Item 2: one flipped byte in each part of a segment's object, one at a time, and in a base-backup
/// part: refused as damage, naming the object, nothing handed over.
fn damage_is_refused(s: &Setup, reading: &Path, segment: &str, backup: &str) {
    let object = s.repo.object_file(&wal_key(segment));
    let location = s.repo.location(&wal_key(segment));
    for Damage { what, offset, value } in places_to_damage(&object) {
        let original = set_byte(&object, offset, value);
        let out = s.wal_fetch(reading, segment);
        put_back(&object, &original);
        assert_eq!(out.code, Some(207), "damage in {what}: {out:#?}");
        assert_refused(&out, 207, &[&location]);
        assert!(out.stderr.contains("damaged") || out.stderr.contains("corrupt"), "{what}: {:?}", out.stderr);
        assert_absent(&s.fetch_dir.join(RECOVERYXLOG));
        assert_no_temp_files(&s.fetch_dir.join("pg_wal"));
    }
    assert_eq!(s.fetched(reading, segment).len(), 1024 * 1024, "whole again once put back");

    let part = s.repo.keys_under(&format!("backups/{backup}/base.tar."))[0].clone();
    let file = s.repo.object_file(&part);
    let size = fs::metadata(&file).unwrap().len() as usize;
    let original = flip_byte(&file, size / 2);
    let target = s.store.path().join("damaged-restore");
    let out = s.base_fetch(reading, backup, &target, &[]);
    put_back(&file, &original);
    assert_eq!(out.code, Some(7), "base-fetch of a damaged part: {out:#?}");
    assert!(out.stderr.contains(&s.repo.location(&part)), "names the part: {}", out.stderr);
    assert!(holds_nothing(&target), "base-fetch left files in {target:?}");
}

/// Item 7: the archive host (recipients only) compares a second push by the seal and the trailer:
/// the same content is 0, other content 5, and a damaged stored copy 7, never 0.
fn keyless_host_compares_by_seal(s: &Setup, archiving: &Path, reading: &Path, segment: &str) {
    let copies = s.store.mkdir("copies");
    let same = copies.join("same");
    fs::write(&same, s.fetched(reading, segment)).unwrap();
    chown_to_server_user(&same);
    let out = s.wal_push(archiving, &copies, &same, segment);
    assert_eq!(out.code, Some(0), "the same segment again: {out:#?}");
    assert_one_line(&out);

    let other = copies.join("other");
    let mut bytes = fs::read(&same).unwrap();
    bytes[700_000] ^= 0x01;
    fs::write(&other, &bytes).unwrap();
    chown_to_server_user(&other);
    let out = s.wal_push(archiving, &copies, &other, segment);
    assert_refused(&out, 5, &[segment]);

    let object = s.repo.object_file(&wal_key(segment));
    let size = fs::metadata(&object).unwrap().len() as usize;
    let original = flip_byte(&object, size / 2);
    let out = s.wal_push(archiving, &copies, &same, segment);
    put_back(&object, &original);
    assert_refused(&out, 7, &[&s.repo.location(&wal_key(segment))]);
}

/// Item 3, reading: another key pair's identity, and no `[encryption]` at all.
fn wrong_or_missing_keys_are_refused(s: &Setup, a: &KeyPair, b: &KeyPair, segment: &str) {
    let location = s.repo.location(&wal_key(segment));
    let wrong = s.config("wrong.toml", &encryption_table(&[], &[b], ""));
    let out = s.wal_fetch(&wrong, segment);
    assert_refused(&out, 214, &[&location, &a.id, &b.id]);
    assert_absent(&s.fetch_dir.join(RECOVERYXLOG));

    let plain = s.config("none.toml", "");
    let out = s.wal_fetch(&plain, segment);
    assert_refused(&out, 214, &[&location]);
    assert_absent(&s.fetch_dir.join(RECOVERYXLOG));
}

/// Item 3, writing: recipients into a plain repository, none into an encrypted one; wal-push and
/// base-push both refused before they write anything. Each wal-push offers a whole segment (still in
/// pg_wal) that the repository does not hold yet, so that a push let through would add an object.
fn mixing_is_refused(s: &Setup, primary: &Cluster, plain: &Plain, a: &KeyPair, segments: [&str; 2]) {
    let data = primary.data_dir();
    let [not_in_plain, not_in_encrypted] = segments;
    assert!(!plain.repo.object_file(&wal_key(not_in_plain)).exists(), "{not_in_plain} in the plain repository");
    assert!(!s.repo.object_file(&wal_key(not_in_encrypted)).exists(), "{not_in_encrypted} in the encrypted one");

    let into_plain = config_with(&plain.repo, plain.store.path(), "encrypting.toml", &encryption_table(&[a], &[], ""));
    let before = plain.repo.files_under("");
    let mut cmd = command(&plain.repo, "wal-push", data);
    let file = Path::new("pg_wal").join(not_in_plain);
    let out = run(cmd.args(config_args(&into_plain)).arg(&file).arg(not_in_plain));
    assert_refused(&out, 14, &["not encrypted", "walship-key enable"]);
    let out = run(&mut base_push_command(primary, &config_args(&into_plain), plain.store.path(), &[]));
    assert_refused(&out, 14, &["not encrypted", "walship-key enable"]);
    assert_eq!(plain.repo.files_under(""), before, "nothing written to the plain repository");

    let unencrypted = s.config("plain-writer.toml", "");
    let before = s.snapshot();
    let file = Path::new("pg_wal").join(not_in_encrypted);
    let out = s.wal_push(&unencrypted, data, &file, not_in_encrypted);
    assert_refused(&out, 14, &["the repository is encrypted", "nothing was written"]);
    let out = s.base_push(primary, &unencrypted);
    assert_refused(&out, 14, &["the repository is encrypted", "nothing was written"]);
    assert_eq!(s.snapshot(), before, "nothing written to the encrypted repository");
}

/// A plain repository of the same kind beside the scenario's, in a scratch directory of its own.
struct Plain {
    store: Scratch,
    repo: Repository,
}

walship_tests::every_backend!(rotated_keys_restore_with_old_and_new_identities);

/// Item 4: the base backup and the first WAL are written for key A, later WAL for key B (the
/// archive_command's file rewritten while the cluster runs). Restored with identities [B] alone,
/// recovery stops at the first object of A's with 214 naming A's key id, and never promotes; with
/// [B, A] the same data directory then recovers to the target with every row.
fn rotated_keys_restore_with_old_and_new_identities(backend: Backend) {
    let s = Setup::new(backend, "rotate");
    let (a, b) = (s.key("a"), s.key("b"));
    let archiving = s.config("archive.toml", &encryption_table(&[&a], &[], ""));
    let mut primary = archiving_cluster(&format!("{}-rotate", backend.label()), &archiving);
    add(&primary, "A", 1000);
    let backup = pushed_backup(&s.base_push(&primary, &archiving));
    let under_a = archive_all(&primary);

    // The next wal-push call reads the new file.
    rewrite_config(&s.repo, &archiving, &encryption_table(&[&b], &[], ""));
    add(&primary, "B", 500);
    let under_b = archive_all(&primary);
    let target = target_time(&primary);
    add(&primary, "late", 200);
    archive_all(&primary);
    assert_eq!(framing_key_ids(&s.repo.object_file(&wal_key(&under_a))), vec![a.id.clone()], "{under_a}");
    assert_eq!(framing_key_ids(&s.repo.object_file(&wal_key(&under_b))), vec![b.id.clone()], "{under_b}");
    assert_log_clean(&primary);
    primary.crash();
    drop(primary);

    let reading = s.config("read.toml", &encryption_table(&[&b], &[&b, &a], ""));
    // Archiving kept: the promoted copy's history file goes to the repository, written for B.
    let extra = ["--target-time", &target, "--keep-archiving"];
    let mut restored = restore(&s, &format!("{}-rotated", backend.label()), &reading, &backup, &extra);
    // The restore_command base-fetch wrote reads this file: without A's identity recovery cannot go on.
    rewrite_config(&s.repo, &reading, &encryption_table(&[&b], &[&b], ""));
    let _ = restored.try_start();
    wait_stopped_or_promoted(&restored);
    let log = restored.log_contents();
    assert!(log.contains("exit code 214"), "wal-fetch did not exit 214\n{}", restored.log_tail());
    let refusal = log.lines().find(|l| l.starts_with("wal-fetch: error")).unwrap_or_default();
    assert!(refusal.contains(&a.id) && refusal.contains(&b.id), "names both keys: {refusal:?}");
    assert!(!log.contains("selected new timeline"), "recovery ended and promoted\n{}", restored.log_tail());
    assert!(!restored.data_dir().join("pg_wal/00000002.history").exists(), "promoted with rows missing");
    assert!(!restored.is_running(), "recovery stopped: the server exits\n{}", restored.log_tail());

    rewrite_config(&s.repo, &reading, &encryption_table(&[&b], &[&b, &a], ""));
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(batches(&restored), "A:1000 B:500", "every row up to the target, none after");
    restored.wait_archived("00000002.history", WAIT_TIMEOUT);
    let history = s.repo.object_file(&wal_key("00000002.history"));
    assert_eq!(framing_key_ids(&history), vec![b.id.clone()], "the history file is encrypted for B");
    assert_log_clean(&restored);
}

walship_tests::every_backend!(encrypting_an_existing_plain_repository);

/// Item 5: a plain repository with segments and a base backup; `walship-key enable`, then the
/// archive_command's file gets recipients. New segments are encrypted, old ones stay plain; without
/// accept_plain the old objects are refused (14, 214 from wal-fetch), with it a restore across the
/// switch has every row.
fn encrypting_an_existing_plain_repository(backend: Backend) {
    let s = Setup::new(backend, "enable");
    let a = s.key("a");
    let archiving = s.config("archive.toml", "");
    let mut primary = archiving_cluster(&format!("{}-enable", backend.label()), &archiving);
    add(&primary, "plain", 1000);
    let backup = pushed_backup(&s.base_push(&primary, &archiving));
    let old = archive_all(&primary);

    let encrypting = encryption_table(&[&a], &[], "");
    let mut enable = command(&s.repo, "walship-key", s.cwd());
    let out = run(enable.arg("enable").args(config_args(&s.config("enable.toml", &encrypting))));
    assert_eq!(out.code, Some(0), "walship-key enable: {out:#?}");
    assert!(s.repo.object_file("encryption.json").is_file(), "no encryption record in the {}", s.repo.describe());
    rewrite_config(&s.repo, &archiving, &encrypting);
    add(&primary, "encrypted", 500);
    let new = archive_all(&primary);
    let target = target_time(&primary);
    add(&primary, "late", 200);
    archive_all(&primary);
    assert_eq!(stage_byte(&s.repo.object_file(&wal_key(&old))), 0, "{old} was written plain");
    assert_eq!(stage_byte(&s.repo.object_file(&wal_key(&new))), 2, "{new} is encrypted");
    assert_log_clean(&primary);
    primary.crash();
    drop(primary);

    let strict = s.config("strict.toml", &encryption_table(&[&a], &[&a], ""));
    let out = s.wal_fetch(&strict, &old);
    assert_refused(&out, 214, &[&s.repo.location(&wal_key(&old)), "accept_plain"]);
    assert_absent(&s.fetch_dir.join(RECOVERYXLOG));
    let target_dir = s.store.path().join("strict-restore");
    let out = s.base_fetch(&strict, &backup, &target_dir, &[]);
    assert_eq!(out.code, Some(14), "base-fetch of a plain backup without accept_plain: {out:#?}");
    assert!(out.stderr.contains("accept_plain"), "names accept_plain: {}", out.stderr);
    assert!(holds_nothing(&target_dir), "base-fetch left files in {target_dir:?}");

    let lenient = s.config("lenient.toml", &encryption_table(&[&a], &[&a], "accept_plain = true\n"));
    let mut restored =
        restore(&s, &format!("{}-enabled", backend.label()), &lenient, &backup, &["--target-time", &target]);
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(batches(&restored), "encrypted:500 plain:1000", "rows from both sides of the switch");
    assert_log_clean(&restored);
}

walship_tests::some_backends!([local] passphrase_mode_and_key_files);

/// Items 6 and 8: a cluster archives with a passphrase file alone and is restored to a target time
/// with every row; key files that other users may read and short passphrases are refused (exit 3,
/// 203 from wal-fetch) naming the file; no output carries the passphrase. Key files are read the
/// same whatever the store, so this runs on local disk only.
fn passphrase_mode_and_key_files(backend: Backend) {
    let s = Setup::new(backend, "passphrase");
    let file = s.keys.join("passphrase");
    let mut make = command(&s.repo, "walship-key", s.cwd());
    let out = run(make.arg("passphrase").arg("--output").arg(&file));
    assert_eq!(out.code, Some(0), "walship-key passphrase: {out:#?}");
    chown_to_server_user(&file);
    remember_secret(&fs::read_to_string(&file).unwrap());
    let table = format!("[encryption]\npassphrase_file = {:?}\n", file.display().to_string());
    let archiving = s.config("archive.toml", &table);
    let mut primary = archiving_cluster("passphrase", &archiving);
    add(&primary, "before", 1000);
    let backup = pushed_backup(&s.base_push(&primary, &archiving));
    add(&primary, "after", 300);
    let segment = archive_all(&primary);
    let target = target_time(&primary);
    add(&primary, "late", 200);
    archive_all(&primary);
    assert_eq!(stage_byte(&s.repo.object_file(&wal_key(&segment))), 2, "{segment} is encrypted");
    assert_log_clean(&primary);
    primary.crash();
    drop(primary);

    key_files_others_can_read_are_refused(&s, &file, &segment);

    let mut restored = restore(&s, "passphrase-restored", &archiving, &backup, &["--target-time", &target]);
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(batches(&restored), "after:300 before:1000", "every row up to the target, none after");
    assert_log_clean(&restored);
}

/// Item 6: an identity file or a passphrase file with mode 0644 or 0640, and a short passphrase, are
/// refused by wal-push (3) and wal-fetch (203), one line naming the file.
fn key_files_others_can_read_are_refused(s: &Setup, passphrase: &Path, segment: &str) {
    use std::os::unix::fs::PermissionsExt;
    let key = s.key("loose");
    let identity = s.config("loose-identity.toml", &encryption_table(&[], &[&key], ""));
    let table = format!("[encryption]\npassphrase_file = {:?}\n", passphrase.display().to_string());
    let with_passphrase = s.config("loose-passphrase.toml", &table);
    let source = s.fetch_dir.join("pg_wal").join(segment);
    for (file, config) in [(&key.identity_file, &identity), (&passphrase.to_owned(), &with_passphrase)] {
        for mode in [0o644, 0o640] {
            fs::set_permissions(file, fs::Permissions::from_mode(mode)).unwrap();
            let push = s.wal_push(config, &s.fetch_dir, &source, segment);
            let fetch = s.wal_fetch(config, segment);
            fs::set_permissions(file, fs::Permissions::from_mode(0o600)).unwrap();
            let shown = file.display().to_string();
            assert_refused(&push, 3, &[&shown, "chmod 600"]);
            assert_refused(&fetch, 203, &[&shown, "chmod 600"]);
        }
    }
    let short = s.keys.join("short");
    fs::write(&short, "tooshort\n").unwrap();
    fs::set_permissions(&short, fs::Permissions::from_mode(0o600)).unwrap();
    chown_to_server_user(&short);
    remember_secret("tooshort");
    let config =
        s.config("short.toml", &format!("[encryption]\npassphrase_file = {:?}\n", short.display().to_string()));
    let out = s.wal_push(&config, &s.fetch_dir, &source, segment);
    assert_refused(&out, 3, &[&short.display().to_string(), "shorter"]);
    let mut status = command(&s.repo, "walship-key", s.cwd());
    let out = run(status.arg("status").args(config_args(&config)));
    assert_refused(&out, 3, &[&short.display().to_string()]);
}
