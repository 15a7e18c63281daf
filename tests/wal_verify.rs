//! wal-verify against a real PostgreSQL 15 archiving through wal-push and backed up by base-push,
//! on all three repositories (local disk, S3 on s3s-fs, SSH on a real sshd). Every run goes through
//! `verify_wal::wal_verify`, which also proves the repository byte for byte unchanged by it.
//!
//! - A healthy archive passes: exit 0, `--json` healthy with the counts of the repository, the
//!   metrics file parses with no gap and healthy 1; `--deep` reads every object.
//! - Two consecutive segments deleted after the newest backup: exit 13 and one gap naming exactly
//!   that range and both backups; a backup's own start segment deleted: incomplete_backup_wal
//!   naming it.
//! - A byte flipped in a stored segment: unseen without `--deep` (exit 0, nothing read), named with
//!   `--deep` (exit 13); another segment's intact object under a segment's name: named too.
//! - An archive older than `--max-age`: stale_archive naming the newest segment.
//! - After a promotion the history file of timeline 2 is followed; removed, missing_history; one
//!   that says the timeline began after its first archived segment, history_mismatch.
//! - A location that is not a repository, or a store that cannot be reached: exit 6 or 8, never
//!   13, and the metrics say "could not check".

use std::path::Path;
use std::time::Duration;

use walship::wal::{WalFileKind, WalFileName, parse_lsn, segment_file_name};
use walship_tests::backups::base_push;
use walship_tests::expire::{
    SEGMENT_SIZE, all_keys, archive_and_stop, insert_batch, primary, promoted_standby, record, start_segment,
};
use walship_tests::repository::{Backend, ConfigLines, Repository};
use walship_tests::verify_wal::{
    VerifySetup, findings, flip_byte, metric, move_aside, parse_metrics, put_back, snapshot, wal_verify,
};

walship_tests::every_backend!(
    a_healthy_archive_passes,
    deleted_segments_are_named_as_a_range,
    a_damaged_object_is_found_with_deep_only,
    a_stale_archive_fails_max_age,
    a_missing_history_file_after_a_promotion,
    a_location_that_is_no_repository_cannot_be_checked,
);

const ROWS: i64 = 1000;

/// A primary archiving into the setup's repository: `backups` base backups, a batch (one segment)
/// before each and four after the last; stopped with everything archived. Returns the backups.
fn archive(setup: &VerifySetup, label: &str, backups: usize) -> Vec<String> {
    let cluster = primary(label, &setup.repo);
    let mut names = Vec::new();
    for batch in 1..=backups {
        insert_batch(&cluster, batch as i64, ROWS);
        names.push(base_push(&cluster, &setup.repo_args, setup.store.path(), &[]).0);
    }
    for batch in 1..=4 {
        insert_batch(&cluster, (backups + batch) as i64, ROWS);
    }
    archive_and_stop(cluster);
    names
}

/// The keys of the complete segments on `timeline`, by segment number.
fn segment_keys(repo: &Repository, timeline: u32) -> Vec<(u64, String)> {
    let mut found: Vec<(u64, String)> = all_keys(repo)
        .into_iter()
        .filter_map(|key| {
            let name = WalFileName::parse(key.rsplit('/').next()?).ok()?;
            let number = name.segment_number(SEGMENT_SIZE)?;
            (name.kind() == WalFileKind::Segment && name.timeline() == timeline).then_some((number, key))
        })
        .collect();
    found.sort();
    found
}

fn stop_segment(record: &serde_json::Value) -> u64 {
    parse_lsn(record["stop_lsn"].as_str().expect("stop_lsn")).expect("an LSN") / u64::from(SEGMENT_SIZE)
}

fn name_of(segment: u64) -> String {
    segment_file_name(1, segment, SEGMENT_SIZE).expect("a segment name")
}

fn a_healthy_archive_passes(backend: Backend) {
    let setup = VerifySetup::new(backend, "healthy");
    let backups = archive(&setup, &format!("{}-walverify-healthy", backend.label()), 2);
    let keys = all_keys(&setup.repo);
    let wal_objects = keys.iter().filter(|k| k.starts_with("wal/")).count() as u64;
    let segments = segment_keys(&setup.repo, 1);

    let prom = setup.metrics_path("walship-wal.prom");
    let report = setup.report(&["--max-age", "1h", "--metrics", prom.to_str().unwrap()], 0);
    assert_eq!(report["healthy"], true, "{report:#}");
    assert_eq!(report["findings"], serde_json::json!([]));
    assert_eq!((report["gaps"].as_u64(), report["missing_segments"].as_u64()), (Some(0), Some(0)));
    assert_eq!(report["backups"].as_u64(), Some(backups.len() as u64));
    assert_eq!(report["objects"].as_u64(), Some(wal_objects), "{report:#}");
    assert_eq!(report["segments"].as_u64(), Some(segments.len() as u64), "{report:#}");
    assert_eq!(report["deep"], serde_json::Value::Null);
    let timelines = report["timelines"].as_array().unwrap();
    assert_eq!(timelines.len(), 1, "{report:#}");
    assert_eq!(timelines[0]["last"].as_str(), segments.last().map(|(_, k)| k.rsplit('/').next().unwrap()));
    let newest = report["newest_segment"]["name"].as_str().expect("the newest segment");
    assert!(keys.iter().any(|k| k.ends_with(&format!("/{newest}"))), "{newest} is archived: {keys:?}");
    assert!(report["newest_segment"]["age_seconds"].as_f64().is_some_and(|age| age < 3600.0), "{report:#}");

    let figures = parse_metrics(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(metric(&figures, "walship_wal_gaps", &[]), 0.0);
    assert_eq!(metric(&figures, "walship_verify_healthy", &["command=\"wal-verify\""]), 1.0);
    assert_eq!(metric(&figures, "walship_verify_completed", &["command=\"wal-verify\""]), 1.0);
    assert_eq!(metric(&figures, "walship_verify_findings", &["kind=\"gap\""]), 0.0);
    assert_eq!(metric(&figures, "walship_wal_objects", &[]), wal_objects as f64);
    assert!(metric(&figures, "walship_wal_newest_segment_age_seconds", &[]) < 3600.0);

    let human = setup.verify(&[]);
    assert_eq!(human.code, Some(0), "{human:#?}");
    assert!(human.stdout.is_empty(), "without --json nothing goes to stdout: {human:#?}");
    let last = human.stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("wal-verify: healthy: ") && last.contains("2 backups checked"), "{human:#?}");
    assert!(last.contains(newest), "the summary names the newest segment: {last}");
    // A healthy run whose metrics file cannot be written fails with the write's code: monitoring would
    // otherwise go on reading a stale file.
    let unwritable = prom.with_file_name("no-such-dir").join("walship-wal.prom");
    let out = setup.verify(&["--metrics", unwritable.to_str().unwrap()]);
    assert_eq!(out.code, Some(9), "{out:#?}");
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("write metrics") && last.ends_with("(exit 9)"), "{out:#?}");

    let deep = setup.report(&["--deep", "--parallel", "3"], 0);
    assert_eq!(deep["deep"]["verified_objects"].as_u64(), Some(wal_objects), "{deep:#}");
    assert_eq!(deep["deep"]["damaged_objects"].as_u64(), Some(0), "{deep:#}");
}

fn deleted_segments_are_named_as_a_range(backend: Backend) {
    let setup = VerifySetup::new(backend, "gap");
    let backups = archive(&setup, &format!("{}-walverify-gap", backend.label()), 2);
    let (cwd, aside) = (setup.store.path(), setup.store.mkdir("aside"));
    let second = record(&setup.repo_args, cwd, &backups[1]);
    let segments = segment_keys(&setup.repo, 1);
    // Two consecutive segments after the second backup's stop, with a segment archived after them.
    let first_gone = stop_segment(&second) + 1;
    let gone: Vec<&(u64, String)> =
        segments.iter().filter(|(s, _)| (first_gone..=first_gone + 1).contains(s)).collect();
    assert_eq!(gone.len(), 2, "segments {first_gone} and the next are archived: {segments:?}");
    assert!(segments.last().unwrap().0 > first_gone + 1, "and one after them: {segments:?}");
    let moved: Vec<_> = gone.iter().map(|(_, key)| (key, move_aside(&setup.repo, key, &aside))).collect();

    let prom = setup.metrics_path("gap.prom");
    let report = setup.report(&["--metrics", prom.to_str().unwrap()], 13);
    assert_eq!(report["healthy"], false);
    let gaps = findings(&report, "gap");
    assert_eq!(gaps.len(), 1, "{report:#}");
    assert_eq!(gaps[0]["subject"], format!("{}..{}", name_of(first_gone), name_of(first_gone + 1)), "{report:#}");
    let message = gaps[0]["message"].as_str().unwrap();
    assert!(backups.iter().all(|b| message.contains(b.as_str())), "it names the backups it cuts off: {message}");
    assert_eq!(report["findings"].as_array().unwrap().len(), 1, "nothing else: {report:#}");
    assert_eq!((report["gaps"].as_u64(), report["missing_segments"].as_u64()), (Some(1), Some(2)));
    let figures = parse_metrics(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(metric(&figures, "walship_wal_gaps", &[]), 1.0);
    assert_eq!(metric(&figures, "walship_wal_missing_segments", &[]), 2.0);
    assert_eq!(metric(&figures, "walship_verify_findings", &["kind=\"gap\""]), 1.0);
    assert_eq!(metric(&figures, "walship_verify_healthy", &[]), 0.0);
    assert_eq!(metric(&figures, "walship_verify_completed", &[]), 1.0);
    let human = setup.verify(&[]);
    assert_eq!(human.code, Some(13), "{human:#?}");
    assert!(human.stderr.contains(&format!("problem: gap: {message}")), "{human:#?}");
    // A metrics file that cannot be written is said, and the problems still decide the code.
    let unwritable = prom.with_file_name("no-such-dir").join("gap.prom");
    let out = setup.verify(&["--metrics", unwritable.to_str().unwrap()]);
    assert_eq!(out.code, Some(13), "{out:#?}");
    assert!(out.stderr.contains("problem: gap: ") && out.stderr.contains("write metrics"), "{out:#?}");
    for (key, from) in moved {
        put_back(&setup.repo, key, &from);
    }
    assert_eq!(setup.report(&[], 0)["healthy"], true);

    // The second backup's own start segment: it can never become consistent, and the first backup
    // cannot replay past it.
    let start = start_segment(&second);
    let start_key = &segments.iter().find(|(s, _)| *s == start).expect("the start segment").1;
    let from = move_aside(&setup.repo, start_key, &aside);
    let report = setup.report(&[], 13);
    let incomplete = findings(&report, "incomplete_backup_wal");
    assert_eq!(incomplete.len(), 1, "{report:#}");
    assert_eq!(incomplete[0]["subject"], backups[1].as_str());
    assert!(incomplete[0]["message"].as_str().unwrap().contains(&name_of(start)), "{report:#}");
    let gaps = findings(&report, "gap");
    assert_eq!(gaps.len(), 1, "{report:#}");
    assert_eq!(gaps[0]["subject"], format!("{0}..{0}", name_of(start)));
    assert!(gaps[0]["message"].as_str().unwrap().contains(&backups[0]), "{report:#}");
    put_back(&setup.repo, start_key, &from);
}

fn a_damaged_object_is_found_with_deep_only(backend: Backend) {
    let setup = VerifySetup::new(backend, "damaged");
    archive(&setup, &format!("{}-walverify-damaged", backend.label()), 1);
    let segments = segment_keys(&setup.repo, 1);
    let (_, key) = &segments[segments.len() / 2];
    let file = setup.repo.object_file(key);
    let original = std::fs::read(&file).unwrap();
    let before = snapshot(&setup.repo);
    flip_byte(&file);
    assert_ne!(snapshot(&setup.repo), before, "the snapshot sees a byte changed in place");

    let shallow = setup.report(&[], 0);
    assert_eq!((shallow["healthy"].as_bool(), &shallow["deep"]), (Some(true), &serde_json::Value::Null), "{shallow:#}");
    let report = setup.report(&["--deep"], 13);
    let damaged = findings(&report, "damaged_object");
    assert_eq!(damaged.len(), 1, "{report:#}");
    assert_eq!(damaged[0]["subject"], key.as_str());
    assert!(damaged[0]["message"].as_str().unwrap().contains(key.as_str()), "{report:#}");
    assert_eq!(report["deep"]["damaged_objects"].as_u64(), Some(1));
    assert_eq!(report["findings"].as_array().unwrap().len(), 1, "nothing else: {report:#}");
    std::fs::write(&file, &original).unwrap();

    // Intact, checksum and all, but another segment's bytes under this name.
    let (_, other) = &segments[segments.len() / 2 + 1];
    std::fs::copy(setup.repo.object_file(other), &file).unwrap();
    let report = setup.report(&["--deep"], 13);
    let damaged = findings(&report, "damaged_object");
    assert_eq!(damaged.len(), 1, "{report:#}");
    assert_eq!(damaged[0]["subject"], key.as_str());
    assert!(damaged[0]["message"].as_str().unwrap().contains("page header"), "{report:#}");
    std::fs::write(&file, &original).unwrap();
    assert_eq!(setup.report(&["--deep"], 0)["healthy"], true);
}

fn a_stale_archive_fails_max_age(backend: Backend) {
    let setup = VerifySetup::new(backend, "stale");
    archive(&setup, &format!("{}-walverify-stale", backend.label()), 1);
    assert_eq!(setup.report(&["--max-age", "15min"], 0)["healthy"], true);
    std::thread::sleep(Duration::from_secs(2));
    let prom = setup.metrics_path("stale.prom");
    let report = setup.report(&["--max-age", "1s", "--metrics", prom.to_str().unwrap()], 13);
    let stale = findings(&report, "stale_archive");
    assert_eq!(stale.len(), 1, "{report:#}");
    assert_eq!(stale[0]["subject"], report["newest_segment"]["name"], "{report:#}");
    let message = stale[0]["message"].as_str().unwrap();
    assert!(message.contains("more than --max-age 1s: archiving has stalled"), "{message}");
    assert!(report["newest_segment"]["age_seconds"].as_f64().is_some_and(|age| age >= 2.0), "{report:#}");
    let figures = parse_metrics(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(metric(&figures, "walship_verify_findings", &["kind=\"stale_archive\""]), 1.0);
    assert!(metric(&figures, "walship_wal_newest_segment_age_seconds", &[]) >= 2.0);
}

fn a_missing_history_file_after_a_promotion(backend: Backend) {
    let label = backend.label();
    let setup = VerifySetup::new(backend, "history");
    let (repo_args, cwd) = (&setup.repo_args, setup.store.path());
    let old = primary(&format!("{label}-walverify-tl1"), &setup.repo);
    insert_batch(&old, 1, ROWS);
    let (first, _) = base_push(&old, repo_args, cwd, &[]);
    insert_batch(&old, 2, ROWS);
    let new = promoted_standby(old, &format!("{label}-walverify-tl2"));
    insert_batch(&new, 3, ROWS);
    let (second, _) = base_push(&new, repo_args, cwd, &[]);
    insert_batch(&new, 4, ROWS);
    archive_and_stop(new);

    let report = setup.report(&[], 0);
    let timelines: Vec<(u64, bool)> = report["timelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["timeline"].as_u64().unwrap(), t["history"].as_bool().unwrap()))
        .collect();
    assert_eq!(timelines, [(1, false), (2, true)], "{report:#}");
    assert_eq!(report["backups"].as_u64(), Some(2), "{first} and {second}: {report:#}");

    let history = "wal/history/00000002.history";
    let from = move_aside(&setup.repo, history, &setup.store.mkdir("aside"));
    let report = setup.report(&[], 13);
    let missing = findings(&report, "missing_history");
    assert_eq!(missing.len(), 1, "{report:#}");
    assert_eq!(missing[0]["subject"], "00000002.history");
    assert!(missing[0]["message"].as_str().unwrap().contains(history), "{report:#}");
    put_back(&setup.repo, history, &from);
    assert_eq!(setup.report(&[], 0)["healthy"], true);

    // A history file that says timeline 2 began long after its first archived segment.
    let file = setup.repo.object_file(history);
    let original = std::fs::read(&file).unwrap();
    let later = walship::codec::encode_all(b"1\t0/7F000000\tno recovery target specified\n", 1).unwrap();
    std::fs::write(&file, later).unwrap();
    let report = setup.report(&[], 13);
    let mismatch = findings(&report, "history_mismatch");
    assert_eq!(mismatch.len(), 1, "{report:#}");
    assert_eq!(mismatch[0]["subject"], "00000002.history");
    assert!(mismatch[0]["message"].as_str().unwrap().contains("began at 0/7F000000"), "{report:#}");
    std::fs::write(&file, original).unwrap();
    assert_eq!(setup.report(&[], 0)["healthy"], true);
}

/// Runs wal-verify with `--metrics` and checks that it could not check: exit `codes`, one error
/// line, and metrics that say "not completed".
#[track_caller]
fn assert_could_not_check(repo: &Repository, repo_args: &[std::ffi::OsString], cwd: &Path, codes: &[i32]) {
    let prom = cwd.join("unchecked.prom");
    let out = wal_verify(repo, repo_args, cwd, &["--json", "--metrics", prom.to_str().unwrap()]);
    assert!(out.code.is_some_and(|code| codes.contains(&code)), "exit {codes:?}, not 13: {out:#?}");
    assert!(out.stdout.is_empty(), "no report: {out:#?}");
    assert_eq!(out.stderr.lines().count(), 1, "one line: {out:#?}");
    let figures = parse_metrics(&std::fs::read_to_string(&prom).unwrap());
    assert_eq!(metric(&figures, "walship_verify_completed", &["command=\"wal-verify\""]), 0.0);
    assert_eq!(metric(&figures, "walship_verify_healthy", &["command=\"wal-verify\""]), 0.0);
}

fn a_location_that_is_no_repository_cannot_be_checked(backend: Backend) {
    let setup = VerifySetup::new(backend, "norepo");
    let cwd = setup.store.path();
    // Reachable, but nothing has ever been archived there: not a walship repository.
    assert_could_not_check(&setup.repo, &setup.repo_args, cwd, &[6]);
    let unreachable = match backend {
        Backend::Local => vec!["--repo".into(), cwd.join("not-there").into()],
        Backend::S3 => {
            let lines =
                ConfigLines { endpoint: Some("http://127.0.0.1:9"), deadline_secs: Some(2), ..Default::default() };
            vec!["--config".into(), setup.repo.write_config(cwd, "dead.toml", lines).into()]
        }
        Backend::Ssh => {
            let lines = ConfigLines { deadline_secs: Some(2), ..Default::default() };
            let port = setup.repo.ssh_server().expect("an SSH repository").port();
            let text = setup.repo.config_text(lines).replace(&format!("127.0.0.1:{port}/"), "127.0.0.1:9/");
            vec!["--config".into(), walship_tests::s3::write_config_file(cwd, "dead.toml", &text).into()]
        }
    };
    assert_could_not_check(&setup.repo, &unreachable, cwd, &[8]);
}
