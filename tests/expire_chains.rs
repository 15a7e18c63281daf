//! base-expire over chains of incremental backups, on all three repositories (local disk, S3 on
//! s3s-fs, SSH on a real sshd). The chains are real full backups of a PostgreSQL 15 cluster whose
//! catalog records are rewritten into incremental ones (type, parent, record format 2): base-expire
//! reads only records, and removes parts, so it sees them as a real chain.
//!
//! `a_kept_incremental_keeps_its_chain_claims_and_broken_links`, with backups B0 (full), B1 on B0,
//! B2 (full), B3 on B2, and `--keep 1` throughout:
//! - killed right after its first expiry mark (B1's, the newest expired: children go first); a
//!   base-push claiming B1 at that moment finds the mark (and would take no incremental on it);
//! - rerun with the claim fresh: B1 stays (`claimed`, needed by the child being taken) and B0 with it
//!   (`needed-by` B1), B2 stays for B3 (`needed-by`), nothing is removed, no mark is left;
//! - once the claim is older than `abandoned_after` (and has no child record) it is removed, and B0
//!   and B1 go; WAL from B2's start stays: wal-verify finds no gap, and B2 restores to the end of the
//!   archive with every row;
//! - B3's parent made a backup the catalog no longer has: B3 is reported as a broken chain, counts for
//!   no `--keep` (B2 is the newest restore point) and deletes nothing more; after a newer full backup
//!   it goes with B2, the backups of its age.
//!
//! `a_real_chain_on_postgresql_18`: real incremental backups (`base-push --incremental`, WAL
//! summaries on), a full F0, then a full F and incrementals I1 on F and I2 on I1:
//! - base-verify I2 checks F, I1 and I2; wal-verify finds the archive whole for every one of them;
//! - base-expire `--keep 1` killed right after marking F0: `base-push --incremental --from F0` then
//!   refuses (an incremental on a parent being expired cannot be taken) and leaves no claim; the rerun
//!   removes F0 and keeps F and I1 for I2 (`needed-by`);
//! - after a new full backup F2, `--keep 1` removes the chain, children first, and wal-verify still
//!   finds the archive whole.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use walship_tests::backups::{base_command_in, base_push};
use walship_tests::expire::{
    ExpireSetup, all_keys, archive_and_stop, base_expire_command, claim_key, expire_json, insert_batch, kept_entry,
    make_incremental, names_in, primary, record, restored_count, start_segment, wal_from, write_claim,
};
use walship_tests::pg::{Cluster, WAIT_TIMEOUT};
use walship_tests::repository::{Backend, ConfigLines};
use walship_tests::verify_base::{base_verify_command, verify_report};
use walship_tests::verify_wal::wal_verify;
use walship_tests::versions::PgInstall;
use walship_tests::{Output, run};

walship_tests::every_backend!(
    a_kept_incremental_keeps_its_chain_claims_and_broken_links,
    a_real_chain_on_postgresql_18
);

const ROWS_PER_BATCH: i64 = 1000;
/// The incremental backup a base-push is taking on top of B1 when base-expire runs.
const CHILD: &str = "29991231T235959Z";

fn reasons(entry: &serde_json::Value) -> Vec<&str> {
    entry["kept_because"].as_array().expect("kept_because").iter().map(|r| r.as_str().unwrap()).collect()
}

fn needed_by(entry: &serde_json::Value) -> Vec<&str> {
    entry["needed_by"].as_array().expect("needed_by").iter().map(|r| r.as_str().unwrap()).collect()
}

/// base-expire with `args`, aborted right after it wrote its first expiry mark.
#[track_caller]
fn killed_after_marking(repo_args: &[OsString], cwd: &Path, args: &[&str]) -> Output {
    let mut cmd = base_expire_command(repo_args, cwd, args);
    let out = run(cmd.env("WALSHIP_TEST_FAILPOINT", "base-expire:marked:abort"));
    assert_eq!(out.code, None, "base-expire {args:?} should have been killed after marking: {out:#?}");
    out
}

fn a_kept_incremental_keeps_its_chain_claims_and_broken_links(backend: Backend) {
    let label = backend.label();
    let setup = ExpireSetup::new(backend, "chains", ConfigLines::default());
    let (repo, repo_args, cwd) = (&setup.repo, &setup.repo_args, setup.store.path());
    let short = ConfigLines { tables: "[retention]\nabandoned_after = \"2s\"", ..ConfigLines::default() };
    let short_args: Vec<OsString> = vec!["--config".into(), repo.write_config(cwd, "short.toml", short).into()];

    // --- Four backups, made two chains: B0 <- B1 and B2 <- B3. ---
    let cluster = primary(&format!("{label}-expire-chains"), repo);
    let mut b = Vec::new();
    for batch in 1..=4 {
        insert_batch(&cluster, batch, ROWS_PER_BATCH);
        b.push(base_push(&cluster, repo_args, cwd, &[]).0);
    }
    insert_batch(&cluster, 5, ROWS_PER_BATCH);
    make_incremental(repo, &b[1], Some(&b[0]));
    make_incremental(repo, &b[3], Some(&b[2]));
    let keep = ["--keep", "1"];

    // --- Killed after its first mark: B1's, the newest backup it expires. A base-push claiming B1
    // now finds the mark. ---
    killed_after_marking(repo_args, cwd, &keep);
    let marks: Vec<String> = repo.keys_under("catalog/").into_iter().filter(|k| k.ends_with(".expiring")).collect();
    assert_eq!(marks, [format!("catalog/{}.expiring", b[1])], "children are marked first");
    write_claim(repo, &b[1], CHILD);

    // --- Rerun: the fresh claim keeps B1, and B1 keeps B0; B3 keeps B2. ---
    let before = all_keys(repo);
    let report = expire_json(repo_args, cwd, &keep);
    assert_eq!(names_in(&report, "expired"), Vec::<String>::new(), "{report:#}");
    assert_eq!(names_in(&report, "kept"), b, "{report:#}");
    let (b0, b1, b2, b3) = (
        kept_entry(&report, &b[0]),
        kept_entry(&report, &b[1]),
        kept_entry(&report, &b[2]),
        kept_entry(&report, &b[3]),
    );
    assert_eq!((reasons(b1), needed_by(b1)), (vec!["claimed"], vec![CHILD]), "{b1:#}");
    assert_eq!((reasons(b0), needed_by(b0)), (vec!["needed-by"], vec![b[1].as_str()]), "{b0:#}");
    assert_eq!((reasons(b2), needed_by(b2)), (vec!["needed-by"], vec![b[3].as_str()]), "{b2:#}");
    assert_eq!(
        (&b3["type"], &b3["parent"], &b0["type"]),
        (&"incremental".into(), &b[2].clone().into(), &"full".into())
    );
    let after = all_keys(repo);
    let marks_left: Vec<&String> = after.iter().filter(|k| k.ends_with(".expiring")).collect();
    assert!(marks_left.is_empty(), "the claimed backup's mark is removed again: {marks_left:?}");
    // Only the mark goes, and the WAL before B0, which no kept backup needs.
    let b0_start = start_segment(&record(repo_args, cwd, &b[0]));
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    let mut expected: BTreeSet<String> = &before - &wal_from(&before, b0_start);
    expected.retain(|k| k.starts_with("wal/") || k.ends_with(".expiring"));
    expected.retain(|k| !k.starts_with("wal/history/"));
    assert_eq!(gone, expected, "nothing of the chains is removed while B1 is claimed");

    // --- The claim abandoned (older than abandoned_after, no child record): removed, and the chain
    // B0 <- B1 goes; WAL from B2's start on stays. ---
    std::thread::sleep(Duration::from_secs(3));
    let wal_before = wal_from(&all_keys(repo), start_segment(&record(repo_args, cwd, &b[2])));
    let report = expire_json(&short_args, cwd, &keep);
    assert_eq!(names_in(&report, "expired"), [b[0].clone(), b[1].clone()], "{report:#}");
    assert_eq!(report["housekeeping"]["claims"], 1, "the stale claim: {report:#}");
    let after = all_keys(repo);
    assert!(!after.contains(&claim_key(&b[1], CHILD)), "the stale claim is left");
    assert!(after.iter().all(|k| !k.contains(&b[0]) && !k.contains(&b[1])), "objects of B0 or B1 are left: {after:?}");
    assert!(wal_before.is_subset(&wal_from(&after, 0)), "WAL from the start of B2, needed by B3, went");
    let last = cluster.switch_wal();
    cluster.wait_archived(&last, WAIT_TIMEOUT);
    let verified = wal_verify(repo, repo_args, cwd, &[]);
    assert_eq!(verified.code, Some(0), "wal-verify after the expiry: {verified:#?}");
    let rows = restored_count(repo_args, cwd, &format!("{label}-chains-r2"), &b[2], &[], "select count(*) from t");
    assert_eq!(rows, 5 * ROWS_PER_BATCH, "B2, kept for B3, restores to the end of the archive");

    // --- B3's parent made one the catalog no longer has: reported, counted for nothing. ---
    make_incremental(repo, &b[3], Some(&b[1]));
    let before = all_keys(repo);
    let out = run(&mut base_expire_command(repo_args, cwd, &[&keep[..], &["--json"]].concat()));
    assert_eq!(out.code, Some(0), "{out:#?}");
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(names_in(&report, "expired"), Vec::<String>::new(), "{report:#}");
    let (b2, b3) = (kept_entry(&report, &b[2]), kept_entry(&report, &b[3]));
    assert!(reasons(b2).contains(&"newest"), "B2 is the newest restore point: {report:#}");
    assert_eq!(reasons(b3), ["keep"], "B3 is newer than the restore point --keep 1 reaches: {report:#}");
    let broken = b3["broken_chain"].as_str().unwrap_or_else(|| panic!("B3's chain is broken: {b3:#}"));
    assert!(broken.contains(&b[1]) && broken.contains("no longer in the catalog"), "{broken}");
    assert!(out.stderr.contains("warning: broken chain") && out.stderr.contains(&b[1]), "{}", out.stderr);
    assert_eq!(all_keys(repo), before, "a broken chain deletes nothing more");

    // --- A newer full backup: the broken one goes with the backups of its age. ---
    insert_batch(&cluster, 6, ROWS_PER_BATCH);
    let (b4, _) = base_push(&cluster, repo_args, cwd, &[]);
    archive_and_stop(cluster);
    let report = expire_json(repo_args, cwd, &keep);
    assert_eq!(names_in(&report, "expired"), [b[2].clone(), b[3].clone()], "{report:#}");
    assert_eq!(names_in(&report, "kept"), [b4], "{report:#}");
}

/// base-push with walship `flags` (before `--`) against `cluster`, with its own programs on PATH.
fn push_with(cluster: &Cluster, repo_args: &[OsString], cwd: &Path, flags: &[&str]) -> Output {
    let mut cmd = base_command_in(cluster.install(), "base-push", repo_args, cwd);
    cmd.args(flags);
    cluster.libpq_env(&mut cmd).args(["--", "--checkpoint=fast"]);
    run(&mut cmd)
}

/// [`push_with`] that must succeed; returns the backup's name.
#[track_caller]
fn pushed(cluster: &Cluster, repo_args: &[OsString], cwd: &Path, flags: &[&str]) -> String {
    let out = push_with(cluster, repo_args, cwd, flags);
    assert_eq!(out.code, Some(0), "base-push {flags:?}: {out:#?}");
    out.stdout.trim().to_owned()
}

fn a_real_chain_on_postgresql_18(backend: Backend) {
    let label = backend.label();
    let setup = ExpireSetup::new(backend, "chains18", ConfigLines::default());
    let (repo, repo_args, cwd) = (&setup.repo, &setup.repo_args, setup.store.path());
    let install = PgInstall::of(18);
    let settings = [("summarize_wal", "on"), ("wal_keep_size", "256MB")];
    let cluster =
        Cluster::start_archiving_in(&install, &format!("{label}-chains18"), &repo.archive_command(), &settings);
    cluster.psql("create table t(batch int, n int)");

    // --- F0, then F and two incrementals on it. ---
    insert_batch(&cluster, 1, ROWS_PER_BATCH);
    let f0 = pushed(&cluster, repo_args, cwd, &[]);
    insert_batch(&cluster, 2, ROWS_PER_BATCH);
    let f = pushed(&cluster, repo_args, cwd, &[]);
    insert_batch(&cluster, 3, ROWS_PER_BATCH);
    let i1 = pushed(&cluster, repo_args, cwd, &["--incremental"]);
    insert_batch(&cluster, 4, ROWS_PER_BATCH);
    let i2 = pushed(&cluster, repo_args, cwd, &["--incremental"]);
    insert_batch(&cluster, 5, ROWS_PER_BATCH);
    for (child, parent) in [(&i1, &f), (&i2, &i1)] {
        let listed = record(repo_args, cwd, child);
        assert_eq!((&listed["backup_type"], &listed["parent"]), (&"incremental".into(), &parent.clone().into()));
    }

    // --- base-verify checks the chain link by link; wal-verify finds every backup's WAL. ---
    let out = run(&mut base_verify_command(repo_args, cwd, &[&i2, "--json"]));
    assert_eq!(out.code, Some(0), "base-verify {i2}: {out:#?}");
    let report = verify_report(&out);
    let checked: Vec<&str> =
        report["backups"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(checked, [&f, &i1, &i2].map(String::as_str), "{report:#}");
    // A write of its own: a switch out of a segment that holds nothing new does not happen.
    cluster.psql("create table flushed(n int)");
    let last = cluster.switch_wal();
    cluster.wait_archived(&last, WAIT_TIMEOUT);
    let whole = wal_verify(repo, repo_args, cwd, &[]);
    assert_eq!(whole.code, Some(0), "wal-verify over a chain: {whole:#?}");

    // --- An expiry marks F0 and is killed: an incremental on F0 is refused then. ---
    let keep = ["--keep", "1"];
    killed_after_marking(repo_args, cwd, &keep);
    let refused = push_with(&cluster, repo_args, cwd, &["--incremental", "--from", &f0]);
    assert_ne!(refused.code, Some(0), "an incremental backup on a parent being expired: {refused:#?}");
    assert!(refused.stderr.contains(&f0), "the refusal names the parent: {}", refused.stderr);
    let claims: Vec<String> = repo.keys_under("catalog/").into_iter().filter(|k| k.contains(".needed-by-")).collect();
    assert!(claims.is_empty(), "the refused base-push left its claim: {claims:?}");
    let report = expire_json(repo_args, cwd, &keep);
    assert_eq!(names_in(&report, "expired"), [f0], "{report:#}");
    assert_eq!(names_in(&report, "kept"), [&f, &i1, &i2].map(String::clone), "{report:#}");
    assert_eq!(needed_by(kept_entry(&report, &f)), [i1.as_str()]);
    assert_eq!(needed_by(kept_entry(&report, &i1)), [i2.as_str()]);

    // --- A new full backup: the chain goes, children first, and the archive stays whole. ---
    insert_batch(&cluster, 6, ROWS_PER_BATCH);
    let f2 = pushed(&cluster, repo_args, cwd, &[]);
    cluster.psql("drop table flushed");
    archive_and_stop(cluster);
    let report = expire_json(repo_args, cwd, &keep);
    assert_eq!(names_in(&report, "expired"), [&f, &i1, &i2].map(String::clone), "{report:#}");
    assert_eq!(names_in(&report, "kept"), [f2], "{report:#}");
    let left = all_keys(repo);
    assert!(left.iter().all(|k| ![&f, &i1, &i2].iter().any(|n| k.contains(n.as_str()))), "{left:?}");
    let whole = wal_verify(repo, repo_args, cwd, &[]);
    assert_eq!(whole.code, Some(0), "wal-verify after the chain went: {whole:#?}");
}
