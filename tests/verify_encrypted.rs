//! wal-verify and base-verify on an encrypted repository, from the host that archives: it holds the
//! recipient (public key) only, as README recommends, and runs the checks from cron. On all three
//! repositories.
//!
//! - Without a key: exit 0 on a healthy archive, with a note saying what could not be checked (the
//!   history file of the promoted timeline, the page headers); `--deep` checks every object's seal and
//!   recorded length, and names an object with a flipped byte (exit 13); base-verify checks the parts'
//!   and the manifest's seals against the catalog, and names a damaged part (exit 13). Never "could
//!   not check" (14) for what can be checked without a key.
//! - With the key: the full check, no note.

use walship_tests::backups::base_push;
use walship_tests::encryption::config_args;
use walship_tests::expire::{archive_and_stop, insert_batch, promoted_standby};
use walship_tests::keys::{KeyPair, encryption_table};
use walship_tests::pg::{Cluster, archive_command_with_config};
use walship_tests::repository::{Backend, ConfigLines, Repository};
use walship_tests::verify_base::{base_verify, verify_report};
use walship_tests::verify_wal::{findings, flip_byte, wal_verify};
use walship_tests::{Scratch, every_backend};

every_backend!(without_a_key_the_archive_host_checks_what_it_can);

const ROWS: i64 = 500;

fn json(out: &walship_tests::Output, code: i32, what: &str) -> serde_json::Value {
    assert_eq!(out.code, Some(code), "{what}: {out:#?}");
    assert!(!out.stderr.contains("AGE-SECRET-KEY") && !out.stdout.contains("AGE-SECRET-KEY"), "{out:#?}");
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{what} --json: {e}: {out:#?}"))
}

fn without_a_key_the_archive_host_checks_what_it_can(backend: Backend) {
    let label = backend.label();
    let store = Scratch::new(&format!("verify-encrypted-{label}"));
    let repo = Repository::new(backend, &store);
    let key = KeyPair::generate(store.path(), "archive");
    let full_table = encryption_table(&[&key], &[&key], "");
    let full = repo.write_config(store.path(), "full.toml", ConfigLines { tables: &full_table, ..Default::default() });
    let keyless_table = format!("[encryption]\nrecipients = [{:?}]\n", key.recipient);
    let keyless =
        repo.write_config(store.path(), "keyless.toml", ConfigLines { tables: &keyless_table, ..Default::default() });
    let (full_args, keyless_args, cwd) = (config_args(&full), config_args(&keyless), store.path());

    let mut cluster = Cluster::init(&format!("{label}-verify-enc"), Some(1));
    cluster.configure(&[
        ("wal_level", "replica"),
        ("archive_mode", "on"),
        ("archive_command", &archive_command_with_config(&keyless)),
        ("wal_keep_size", "256MB"),
    ]);
    cluster.start();
    cluster.psql("create table t(batch int, n int)");
    insert_batch(&cluster, 1, ROWS);
    let (backup, _) = base_push(&cluster, &keyless_args, cwd, &[]);
    insert_batch(&cluster, 2, ROWS);
    // A second timeline, whose history file only a key reads.
    let promoted = promoted_standby(cluster, &format!("{label}-verify-enc-2"));
    insert_batch(&promoted, 3, ROWS);
    archive_and_stop(promoted);

    let report = json(&wal_verify(&repo, &keyless_args, cwd, &["--json"]), 0, "keyless wal-verify");
    assert_eq!(report["healthy"], true, "{report:#}");
    let note = report["without_key"].as_str().unwrap_or_else(|| panic!("a note on what was not checked: {report:#}"));
    assert!(note.contains("1 encrypted history file(s) not read"), "{note}");
    let human = wal_verify(&repo, &keyless_args, cwd, &[]);
    assert!(human.stderr.lines().last().is_some_and(|l| l.contains("no identity_files")), "{human:#?}");
    let report = json(&wal_verify(&repo, &full_args, cwd, &["--json", "--deep"]), 0, "wal-verify with the key");
    assert_eq!((report["healthy"].as_bool(), &report["without_key"]), (Some(true), &serde_json::Value::Null));
    let objects = report["objects"].as_u64().expect("objects");

    let deep = json(&wal_verify(&repo, &keyless_args, cwd, &["--json", "--deep"]), 0, "keyless --deep");
    assert_eq!(deep["deep"]["verified_objects"].as_u64(), Some(objects), "{deep:#}");
    assert!(deep["without_key"].as_str().is_some_and(|n| n.contains("seal")), "{deep:#}");
    let segment = repo
        .keys_under("wal/")
        .into_iter()
        .filter(|k| k.rsplit('/').next().is_some_and(|n| n.len() == 24 && n.starts_with("00000001")))
        .nth(1)
        .expect("a segment of timeline 1");
    let file = repo.object_file(&segment);
    let original = std::fs::read(&file).unwrap();
    flip_byte(&file);
    let damaged = json(&wal_verify(&repo, &keyless_args, cwd, &["--json", "--deep"]), 13, "keyless, damaged");
    let found = findings(&damaged, "damaged_object");
    assert_eq!(found.len(), 1, "{damaged:#}");
    assert_eq!(found[0]["subject"], segment.as_str());
    assert!(found[0]["message"].as_str().unwrap().contains("seal"), "{damaged:#}");
    std::fs::write(&file, &original).unwrap();

    let report = json(&base_verify(&keyless_args, cwd, &["--json"]), 0, "keyless base-verify");
    assert_eq!(report["healthy"], true, "{report:#}");
    let part = repo
        .keys_under(&format!("backups/{backup}/"))
        .into_iter()
        .find(|k| k.contains("base.tar"))
        .unwrap_or_else(|| panic!("a part of {backup}: {:?}", repo.keys_under("backups/")));
    let file = repo.object_file(&part);
    flip_byte(&file);
    let out = base_verify(&keyless_args, cwd, &["--json"]);
    let report = verify_report(&out);
    assert_eq!(out.code, Some(13), "{out:#?}");
    let found = findings(&report, "damaged_part");
    assert_eq!(found.len(), 1, "{report:#}");
    assert_eq!(found[0]["subject"], part.as_str());
}
