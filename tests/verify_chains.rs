//! base-verify over chains of incremental backups, on all three repositories (local disk, S3 on
//! s3s-fs, SSH on a real sshd). The chain is made of real full backups of a PostgreSQL 15 cluster
//! whose catalog records are rewritten into incremental ones (type, parent, record format 2): the
//! integrity check reads only records, parts and manifests. Every run leaves the repository byte
//! for byte as it was.
//!
//! `a_chain_is_checked_link_by_link`, with B0 (full) <- B1 <- B2:
//! - `base-verify B2` checks B0, B1 and B2 (each one's parts and manifest), `--json` gives each
//!   backup's type, parent and chain; `--all` checks each backup once;
//! - a damaged part of the middle link B1: `base-verify B2` exits 13 with a `damaged_part` naming it;
//! - B1's record gone from the catalog: `base-verify B2` and `--all` exit 13 with a `broken_chain`
//!   for B2 naming B1 (and the metrics count it), and `--restore-test` of B2 restores nothing;
//! - B2's parent made B2 itself, or a chain whose first backup is incremental: the same finding,
//!   with the reason; base-fetch refuses that backup too (exit 7), restoring nothing.

use std::fs;

use walship_tests::assertions::{assert_absent, assert_error};
use walship_tests::backups::{base_fetch, base_push, damage_middle};
use walship_tests::expire::{ExpireSetup, archive_and_stop, insert_batch, make_incremental, primary};
use walship_tests::repository::{Backend, ConfigLines};
use walship_tests::verify_base::{
    RestoreScratch, assert_nothing_left, base_verify, metrics_of, sample, snapshot, verify_report,
};
use walship_tests::verify_wal::{move_aside, put_back};

walship_tests::every_backend!(a_chain_is_checked_link_by_link);

const ROWS: i64 = 1000;

fn names(report: &serde_json::Value) -> Vec<&str> {
    let backups = report["backups"].as_array().unwrap_or_else(|| panic!("backups in {report:#}"));
    backups.iter().map(|b| b["name"].as_str().unwrap()).collect()
}

fn kinds(report: &serde_json::Value) -> Vec<(&str, &str)> {
    let findings = report["findings"].as_array().unwrap_or_else(|| panic!("findings in {report:#}"));
    findings.iter().map(|f| (f["kind"].as_str().unwrap(), f["subject"].as_str().unwrap())).collect()
}

/// Runs base-verify `args --json`, expecting exit `code`, and returns its report.
#[track_caller]
fn verified(repo_args: &[std::ffi::OsString], cwd: &std::path::Path, args: &[&str], code: i32) -> serde_json::Value {
    let out = base_verify(repo_args, cwd, &[args, &["--json"]].concat());
    assert_eq!(out.code, Some(code), "base-verify {args:?}: {out:#?}");
    verify_report(&out)
}

fn a_chain_is_checked_link_by_link(backend: Backend) {
    let label = backend.label();
    let setup = ExpireSetup::new(backend, "bv-chains", ConfigLines::default());
    let (repo, repo_args, cwd) = (&setup.repo, &setup.repo_args, setup.store.path());
    let cluster = primary(&format!("{label}-bv-chains"), repo);
    let mut b = Vec::new();
    for batch in 1..=3 {
        insert_batch(&cluster, batch, ROWS);
        b.push(base_push(&cluster, repo_args, cwd, &[]).0);
    }
    archive_and_stop(cluster);
    make_incremental(repo, &b[1], Some(&b[0]));
    make_incremental(repo, &b[2], Some(&b[1]));
    let before = snapshot(repo);

    // --- The newest backup is checked with every link of its chain. ---
    let report = verified(repo_args, cwd, &[&b[2]], 0);
    assert_eq!(names(&report), b, "{report:#}");
    let last = &report["backups"][2];
    assert_eq!(
        (&last["type"], &last["parent"], &last["verified"]),
        (&"incremental".into(), &b[1].clone().into(), &true.into())
    );
    assert_eq!(last["chain"], serde_json::json!(b), "{last:#}");
    assert_eq!(
        (&report["backups"][0]["type"], &report["backups"][0]["parent"]),
        (&"full".into(), &serde_json::Value::Null)
    );
    assert_eq!(report["catalog"]["backups"][1]["parent"], *b[0], "{report:#}");
    // LATEST is the same backup; --all checks each backup once.
    assert_eq!(names(&verified(repo_args, cwd, &[], 0)), b);
    assert_eq!(names(&verified(repo_args, cwd, &["--all"], 0)), b);

    // --- A damaged part of the middle link. ---
    let key = format!("backups/{}/base.tar.000001", b[1]);
    let part = repo.object_file(&key);
    let original = damage_middle(&part);
    let report = verified(repo_args, cwd, &[&b[2]], 13);
    assert_eq!(kinds(&report), [("damaged_part", key.as_str())], "{report:#}");
    assert_eq!(report["backups"][1]["verified"], false, "{report:#}");
    fs::write(&part, original).unwrap();

    // --- The middle link's record gone: B2's chain is broken, named. ---
    let aside = setup.store.mkdir("aside");
    let record_key = format!("catalog/{}.json", b[1]);
    let moved = move_aside(repo, &record_key, &aside);
    let report = verified(repo_args, cwd, &[&b[2]], 13);
    assert_eq!(kinds(&report), [("broken_chain", b[2].as_str())], "{report:#}");
    let message = report["findings"][0]["message"].as_str().unwrap();
    assert!(message.contains(&format!("its parent {} is no longer in the catalog", b[1])), "{message}");
    assert_eq!(
        (&report["backups"][0]["verified"], &report["backups"][0]["chain"]),
        (&false.into(), &serde_json::Value::Null)
    );
    // A restore test of it is not attempted: the finding says why it cannot restore.
    let scratch = RestoreScratch::create();
    let restore = ["--restore-test", "--scratch", scratch.path().to_str().unwrap(), &b[2]];
    let report = verified(repo_args, cwd, &restore, 13);
    assert_eq!(kinds(&report), [("broken_chain", b[2].as_str())], "{report:#}");
    assert_eq!(report["backups"][0]["restore_test"], serde_json::Value::Null, "{report:#}");
    assert_nothing_left(scratch.path(), "a restore test of a broken chain");
    let metrics = cwd.join("chains.prom");
    let metrics_arg = metrics.to_str().unwrap();
    let report = verified(repo_args, cwd, &["--all", "--metrics", metrics_arg], 13);
    assert_eq!(names(&report), [&b[0], &b[2]].map(String::as_str), "each backup left, once");
    assert_eq!(kinds(&report), [("broken_chain", b[2].as_str())], "{report:#}");
    let samples = metrics_of(&metrics);
    assert_eq!(sample(&samples, "walship_verify_findings", &["kind=\"broken_chain\""]), 1.0);
    assert_eq!(sample(&samples, "walship_backup_verify_healthy", &[&format!("backup=\"{}\"", b[2])]), 0.0);
    fs::remove_file(&metrics).unwrap();
    put_back(repo, &record_key, &moved);

    // --- A parent that is not older than its child, and a chain that begins with an incremental. ---
    let record_file = repo.object_file(&format!("catalog/{}.json", b[2]));
    let record_bytes = fs::read(&record_file).unwrap();
    make_incremental(repo, &b[2], Some(&b[2]));
    let report = verified(repo_args, cwd, &[&b[2]], 13);
    assert!(report["findings"][0]["message"].as_str().unwrap().contains("is not older than it"), "{report:#}");
    fs::write(&record_file, &record_bytes).unwrap();
    let first_file = repo.object_file(&format!("catalog/{}.json", b[0]));
    let first_bytes = fs::read(&first_file).unwrap();
    make_incremental(repo, &b[0], None);
    let report = verified(repo_args, cwd, &["--all"], 13);
    let broken: Vec<&str> = kinds(&report).into_iter().map(|(_, subject)| subject).collect();
    assert_eq!(broken, b, "every backup of a chain without a full backup at its root: {report:#}");
    assert!(report["findings"][0]["message"].as_str().unwrap().contains("names no parent"), "{report:#}");
    // base-fetch judges the chain by the same rules: an incremental link is never restored alone.
    let target = setup.store.path().join("restored-rootless");
    let out = base_fetch(repo_args, cwd, &b[0], &target, &[]);
    assert_error(&out, 7, &[&b[0], "names no parent"]);
    assert_absent(&target);
    fs::write(&first_file, &first_bytes).unwrap();
    assert_eq!(snapshot(repo), before, "base-verify changed the repository");
}
