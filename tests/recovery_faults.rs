//! Faults around a real PostgreSQL 15 that must never end a recovery early or stop archiving for
//! good: a server log that cannot be written, a bug (panic) in wal-fetch or wal-push, a segment
//! whose first page carries XLP_FIRST_IS_OVERWRITE_CONTRECORD after a crash cut a record, and a
//! configuration error next to a secret.

use std::fs;
use std::path::Path;

use walship_tests::pg::{Cluster, WAIT_TIMEOUT, archive_command, restore_command};
use walship_tests::{Scratch, wait_until, wal_fetch};

/// Stderr of both commands goes to a device whose every write fails with ENOSPC, as when the disk
/// of the PostgreSQL log is full.
const LOG_FULL: &str = " 2>/dev/full";

fn count(cluster: &Cluster) -> u64 {
    cluster.psql("select count(*) from marks").parse().unwrap()
}

/// Waits until the server log contains `needle`.
fn wait_for_log(cluster: &Cluster, needle: &str) {
    let what = format!("cluster {}'s log says {needle:?}", cluster.name());
    wait_until(&what, || cluster.log_contents().contains(needle).then_some(()));
}

/// Waits until the postmaster has exited by itself.
fn wait_stopped(cluster: &Cluster) {
    wait_until(&format!("cluster {} has stopped", cluster.name()), || (!cluster.is_running()).then_some(()));
}

/// A `restore_command` or `archive_command` that makes the command panic at `step` (a bug).
fn with_failpoint(step: &str, command: &str) -> String {
    format!("{}={step} {command}", walship::failpoint::FAILPOINT_VAR)
}

/// Before the fix, `eprintln!` panicked on a log write that failed and a panic exited 101, which
/// PostgreSQL takes from restore_command for "not in the archive": recovery found no WAL and ended.
/// Now a failed log line is dropped; a panic (here forced by a failpoint after the file was written)
/// exits 212, which makes PostgreSQL stop the recovery rather than end it; and a panicking wal-push
/// exits 12, which the archiver retries without restarting.
#[test]
fn a_full_log_or_a_panic_never_ends_a_recovery_early() {
    let store = Scratch::new("faults-log");
    let repo = store.mkdir("repo");
    let backup = store.mkdir("base");
    let archiving = format!("{}{LOG_FULL}", archive_command(&repo));
    let mut primary =
        Cluster::start_archiving("log-primary", &with_failpoint("wal-push:archived", &archive_command(&repo)), &[]);
    primary.psql("create table marks(batch text, n int)");
    primary.switch_wal();
    wait_for_log(&primary, "internal error (a bug in walship");
    wait_for_log(&primary, "failed with exit code 12");
    primary.psql(&format!("alter system set archive_command = {}", walship_tests::pg::conf_quote(&archiving)));
    primary.psql("select pg_reload_conf()");
    // Archived although its log goes nowhere (before the fix, wal-push panicked and never did).
    let first = primary.switch_wal();
    primary.wait_archived(&first, WAIT_TIMEOUT);

    primary.base_backup(&backup, &["-Fp", "-X", "none"]);
    // Several 1 MiB segments, each of which recovery has to ask wal-fetch for.
    primary.psql("insert into marks select 'A', g from generate_series(1, 40000) g");
    let last = primary.switch_wal();
    primary.wait_archived(&last, WAIT_TIMEOUT);
    primary.crash();

    let fetching = format!("{}{LOG_FULL}", restore_command(&repo));
    let mut restored = Cluster::restore(
        "log-restored",
        &backup,
        &[("restore_command", &with_failpoint("wal-fetch:restored", &fetching))],
    );
    // The first segment is written to its place, then wal-fetch panics: PostgreSQL must not use it,
    // must not take the exit for "absent", and must stop.
    let _ = restored.try_start();
    wait_stopped(&restored);
    let log = restored.log_contents();
    assert!(log.contains("exit code 212"), "wal-fetch's panic did not exit 212\n{}", restored.log_tail());
    assert!(!log.contains("selected new timeline"), "recovery ended and promoted\n{}", restored.log_tail());
    assert!(!restored.data_dir().join("pg_wal/00000002.history").exists(), "promoted after a panic");

    // The same recovery, with a log that still cannot be written: every row comes back.
    walship_tests::pg::append_settings(
        &restored.data_dir().join("postgresql.auto.conf"),
        &[("restore_command", &fetching)],
    );
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(count(&restored), 40000, "every row committed before the crash\n{}", restored.log_tail());
    let restored_lines = restored.log_contents().matches("restored log file").count();
    assert!(restored_lines >= 2, "recovery took {restored_lines} files from wal-fetch\n{}", restored.log_tail());
}

/// Writes rows until the current WAL segment has less than two pages left, so that the next large
/// record crosses into the next segment (PostgreSQL's own src/test/recovery/t/026_overwrite_contrecord.pl).
const FILL_TO_SEGMENT_END: &str = "DO $$
DECLARE
    wal_segsize int := setting::int FROM pg_settings WHERE name = 'wal_segment_size';
    remain int;
BEGIN
    LOOP
        INSERT INTO filler SELECT g, repeat(encode(sha256(g::text::bytea), 'hex'), (random() * 15 + 1)::int)
        FROM generate_series(1, 10) g;
        remain := wal_segsize - (pg_current_wal_insert_lsn() - '0/0') % wal_segsize;
        IF remain < 2 * setting::int FROM pg_settings WHERE name = 'block_size' THEN
            EXIT;
        END IF;
    END LOOP;
END
$$";

/// XLP_FIRST_IS_OVERWRITE_CONTRECORD, in the `xlp_info` field of a segment's first page header.
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;

fn first_page_flags(segment: &Path) -> u16 {
    let bytes = fs::read(segment).unwrap();
    u16::from_le_bytes([bytes[2], bytes[3]])
}

/// Verified with PostgreSQL 15, as its own test 026 does: a record crossing into a segment that the
/// crash left unwritten is replaced at restart by an XLOG_OVERWRITE_CONTRECORD record, and the new
/// segment's first page carries XLP_FIRST_IS_OVERWRITE_CONTRECORD (0x0008). wal-push used to refuse
/// that flag (it knew 0x0007 only), on every retry, so archiving stopped there until pg_wal filled
/// the disk. Now the segment archives, and a recovery through it returns every committed row.
#[test]
fn a_segment_that_overwrites_a_cut_record_archives_and_restores() {
    let store = Scratch::new("faults-contrec");
    let repo = store.mkdir("repo");
    let backup = store.mkdir("base");
    let mut primary = Cluster::start_archiving("contrec-primary", &archive_command(&repo), &[]);
    primary.psql("create table marks(batch text, n int)");
    primary.psql("create table filler(a int, b text)");
    primary.base_backup(&backup, &["-Fp", "-X", "none"]);
    primary.psql("insert into marks select 'before', g from generate_series(1, 1000) g");

    primary.psql(FILL_TO_SEGMENT_END);
    let start_file = primary.psql("select pg_walfile_name(pg_current_wal_insert_lsn())");
    primary.psql("select pg_logical_emit_message(true, 'walship', repeat('xyzxz', 123456))");
    let cut_file = primary.psql("select pg_walfile_name(pg_current_wal_insert_lsn())");
    assert_ne!(start_file, cut_file, "the message was to cross into the next segment");
    // No shutdown checkpoint, then the segment holding the record's end is lost.
    primary.crash();
    fs::remove_file(primary.data_dir().join("pg_wal").join(&cut_file)).unwrap();
    primary.start();
    primary.psql("insert into marks select 'after', g from generate_series(1, 500) g");
    let last = primary.switch_wal();
    primary.wait_archived(&last, WAIT_TIMEOUT);
    let refusals = primary.psql("select failed_count from pg_stat_archiver");
    assert_eq!(refusals, "0", "archiving failed on the way\n{}", primary.log_tail());

    // The archived segment really is the one PostgreSQL flagged.
    let fetched = store.path().join("fetched");
    let out = wal_fetch(&repo, store.path(), &cut_file, &fetched);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let flags = first_page_flags(&fetched);
    assert_ne!(flags & XLP_FIRST_IS_OVERWRITE_CONTRECORD, 0, "{cut_file}: first page flags 0x{flags:04X}");
    primary.crash();

    let mut restored = Cluster::restore("contrec-restored", &backup, &[("restore_command", &restore_command(&repo))]);
    restored.start();
    restored.wait_recovered(WAIT_TIMEOUT);
    assert_eq!(count(&restored), 1500, "rows before the crash and after the overwrite\n{}", restored.log_tail());
    assert!(restored.log_contents().contains(&format!("restored log file \"{cut_file}\"")), "{}", restored.log_tail());
}

/// A configuration error quotes its line number and key, never the line's value: the message lands
/// in the PostgreSQL server log on every archive_command call.
#[test]
fn a_configuration_error_never_writes_a_secret_into_the_server_log() {
    let store = Scratch::new("faults-secret");
    let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    let config = store.path().join("walship.toml");
    let text = format!(
        "repo = \"s3://walship-x/db1\"\n[s3]\nendpoint = \"http://127.0.0.1:9\"\naccess_key_id = \"AK\"\n\
         secret_acess_key = \"{secret}\"\n"
    );
    fs::write(&config, text).unwrap();
    walship_tests::chown_to_server_user(&config);
    let archiving = walship_tests::pg::archive_command_with_config(&config);
    let primary = Cluster::start_archiving("secret-primary", &archiving, &[]);
    primary.switch_wal();
    wait_for_log(&primary, "failed with exit code 3");
    let log = primary.log_contents();
    assert!(log.contains("secret_acess_key"), "the error names the key\n{}", primary.log_tail());
    assert!(log.contains("walship.toml:5"), "the error names the line\n{}", primary.log_tail());
    assert!(!log.contains(secret) && !log.contains("wJalr"), "the secret reached the server log\n{log}");
}
