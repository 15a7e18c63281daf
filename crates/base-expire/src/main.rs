//! `base-expire`: retention from cron. Deletes the base backups a policy no longer keeps and the WAL
//! no kept backup can need; pins backups that are kept forever.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use walship::config::{Config, parse_duration};
use walship::expire::{self, BackupSummary, ExpireOptions, ExpireReport, Keep, Policy};
use walship::log::Log;
use walship::{Error, base, retry};
use walship_cli::{COMMON_HELP, CommonArgs, human_bytes};

#[derive(Parser, Debug)]
#[command(
    name = "base-expire",
    version,
    about = "Delete the base backups a retention policy no longer keeps, and the WAL no kept backup needs",
    long_about = "Delete the base backups a retention policy no longer keeps, and the WAL no kept backup needs.\n\n\
        The policy comes from --keep and --keep-within, else from the [retention] table; without any, \
        base-expire refuses (exit 2) rather than keep nothing. --keep counts restore points, full and \
        incremental backups alike. Never deleted: the newest restorable backup, a pinned backup, the newest \
        backup the latest timeline can be restored from, every backup a kept incremental backup rests on (its \
        whole chain, reported as needed-by), a backup a running base-push --incremental claims, a backup \
        still being written (it has no catalog record yet), history files, and any WAL a kept backup can need (from its \
        start segment on, on its timeline and those that descend from it; a pinned backup keeps its own \
        start-to-stop range). A repository without backups loses no WAL.\n\n\
        Order: each backup's catalog record goes first (base-list and base-fetch stop seeing it), then its \
        parts, newest backup first so that no incremental backup outlives its parent; WAL after the backups. \
        A run killed anywhere leaves every listed backup restorable; the next run finishes the work. An \
        incremental backup whose chain is already broken is reported (warning: broken chain), counts for no \
        --keep and goes with the backups of its age. Also removes temporary files and S3 multipart uploads \
        older than [retention] abandoned_after (default 24h), left by killed writers, and claims on parent \
        backups that their child's record made redundant or that are older than abandoned_after without one.\n\n\
        Output: one line per expired backup and a summary on stderr; --json prints the report on stdout; \
        --dry-run prints every object a real run would delete (stored bytes, a tab, the key) and deletes \
        nothing. Exit 0 also when nothing was due.\n\n\
        Examples (cron, as postgres):\n    \
        30 4 * * *  base-expire --config /etc/walship/walship.toml --keep 7\n    \
        30 4 * * *  base-expire --keep-within 14d\n    \
        base-expire --pin 20261122T031500Z",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// Keep the N newest restorable backups, full or incremental (N >= 1), and every backup they rest
    /// on [default: [retention] keep]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep: Option<u32>,

    /// Keep what a point-in-time recovery to any moment of the last DURATION needs: 14d, 36h, 1d12h,
    /// 90m, 2w [default: [retention] keep_within]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    keep_within: Option<Duration>,

    /// List every object a real run would delete (stored bytes, tab, key) and delete nothing; with
    /// --json, print the report of what it would delete instead of the list
    #[arg(long)]
    dry_run: bool,

    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,

    /// Pin backup NAME: base-expire keeps it forever (with the WAL that makes it consistent), then exit
    #[arg(long, value_name = "NAME", conflicts_with_all = ["unpin", "keep", "keep_within", "dry_run"])]
    pin: Option<String>,

    /// Remove the pin of backup NAME (it is expired like any other from then on), then exit
    #[arg(long, value_name = "NAME", conflicts_with_all = ["keep", "keep_within", "dry_run"])]
    unpin: Option<String>,
}

fn main() {
    walship_cli::exit_on_panic("base-expire", |code| code as u8);
    let cli: Cli = walship_cli::parse_or_exit("base-expire", |code| code as u8);
    let log = Log::new("base-expire", cli.common.verbose);
    let result = walship_cli::block_on(async {
        let config = cli.common.load_config()?;
        if let Some((name, pinned)) = cli.pin.as_ref().map(|n| (n, true)).or(cli.unpin.as_ref().map(|n| (n, false))) {
            return walship_cli::on_repository(&config, &log, async |repo, deadline| {
                retry::until(deadline, &log, repo.url(), || base::set_pinned(repo, name, pinned)).await
            })
            .await
            .map(|()| Outcome::Pinned(name.clone(), pinned));
        }
        let options = options_of(&cli, &config)?;
        walship_cli::on_repository(&config, &log, async |repo, _deadline| {
            let mut listing = std::io::stdout().lock();
            let mut print = |key: &str, bytes: u64| {
                if cli.dry_run && !cli.json {
                    // A closed pipe (| head) only ends the listing.
                    let _ = writeln!(listing, "{bytes}\t{key}");
                }
            };
            expire::base_expire(repo, &options, &log, &mut print).await
        })
        .await
        .map(Outcome::Expired)
    });
    match result {
        Ok(Outcome::Pinned(name, pinned)) => {
            log.info(format_args!("backup {name} {}", if pinned { "pinned: kept forever" } else { "unpinned" }));
        }
        Ok(Outcome::Expired(report)) => {
            log_report(&log, &report);
            if cli.json {
                walship_cli::print_result_line(&json_report(&report).to_string());
            }
        }
        Err(e) => walship_cli::exit_with(&log, &e),
    }
}

enum Outcome {
    Pinned(String, bool),
    Expired(ExpireReport),
}

/// The policy from the flags, else the `[retention]` table; refuses when neither says anything.
fn options_of(cli: &Cli, config: &Config) -> Result<ExpireOptions, Error> {
    let (keep, keep_within) = match (cli.keep, cli.keep_within) {
        (None, None) => (config.retention.keep, config.retention.keep_within),
        flags => flags,
    };
    if keep.is_none() && keep_within.is_none() {
        return Err(Error::Usage(
            "no retention policy: give --keep N or --keep-within DURATION, or set keep or keep_within in the \
             [retention] table (base-expire never guesses one)"
                .into(),
        ));
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
    Ok(ExpireOptions {
        policy: Policy { keep, keep_within },
        dry_run: cli.dry_run,
        stale_after: config.retention.abandoned_after,
        now,
        deadline: config.deadline,
    })
}

fn log_report(log: &Log, report: &ExpireReport) {
    let verb = if report.dry_run { "would expire" } else { "expired" };
    for backup in &report.expired {
        log.info(format_args!(
            "{verb} backup {} (finished {}, timeline {}, {})",
            backup.name,
            backup.finished_at,
            backup.timeline,
            human_bytes(backup.stored_bytes)
        ));
    }
    for backup in &report.kept {
        if !backup.needed_by.is_empty()
            && backup.kept.iter().all(|k| matches!(k, Keep::NeededBy { .. } | Keep::Claimed))
        {
            log.info(format_args!(
                "keeping backup {} ({}): needed by incremental backup(s) {}",
                backup.name,
                backup.backup_type.as_str(),
                backup.needed_by.join(", ")
            ));
        }
    }
    for backup in report.kept.iter().chain(&report.expired) {
        if let Some(reason) = &backup.broken_chain {
            let fate = match (report.expired.contains(backup), report.dry_run) {
                (true, true) => "it would be expired with the backups of its age",
                (true, false) => "expired with the backups of its age",
                (false, _) => "it counts for no --keep and is kept only while the policy reaches back to it",
            };
            log.info(format_args!("warning: broken chain: {reason}; {fate}"));
        }
    }
    for notice in &report.notices {
        log.info(format_args!("note: {notice}"));
    }
    let first_kept: Vec<String> = report.first_kept_segment.iter().map(|(_, name)| name.clone()).collect();
    let house = &report.housekeeping;
    log.info(format_args!(
        "{}: {} backups kept, {} expired ({} objects, {}); {} WAL files {} ({}){}; housekeeping: {} temporary \
         files, {} multipart uploads, {} claims removed{}",
        if report.dry_run { "dry run, nothing deleted" } else { "done" },
        report.kept.len(),
        report.expired.len(),
        report.backup_objects,
        human_bytes(report.backup_bytes),
        report.wal_files,
        if report.dry_run { "to delete" } else { "deleted" },
        human_bytes(report.wal_bytes),
        if first_kept.is_empty() { String::new() } else { format!(", WAL kept from {}", first_kept.join(", ")) },
        house.temp_files,
        house.uploads,
        report.claims_removed,
        if house.uploads_unlisted { " (the store cannot list multipart uploads)" } else { "" },
    ));
}

fn json_backup(backup: &BackupSummary) -> serde_json::Value {
    serde_json::json!({
        "name": backup.name,
        "finished_at": backup.finished_at,
        "timeline": backup.timeline,
        "stored_bytes": backup.stored_bytes,
        "kept_because": backup.kept.iter().map(|k| k.describe()).collect::<Vec<_>>(),
        "type": backup.backup_type.as_str(),
        "parent": backup.parent,
        "needed_by": backup.needed_by,
        "broken_chain": backup.broken_chain,
    })
}

fn json_report(report: &ExpireReport) -> serde_json::Value {
    let house = &report.housekeeping;
    serde_json::json!({
        "dry_run": report.dry_run,
        "kept": report.kept.iter().map(json_backup).collect::<Vec<_>>(),
        "expired": report.expired.iter().map(json_backup).collect::<Vec<_>>(),
        "resumed": report.resumed,
        "backup_objects": report.backup_objects,
        "backup_bytes": report.backup_bytes,
        "wal_files": report.wal_files,
        "wal_bytes": report.wal_bytes,
        "first_kept_segment": report.first_kept_segment.iter()
            .map(|(timeline, name)| (timeline.to_string(), serde_json::Value::from(name.clone())))
            .collect::<serde_json::Map<_, _>>(),
        "housekeeping": {
            "temp_files": house.temp_files,
            "temp_bytes": house.temp_bytes,
            "multipart_uploads": house.uploads,
            "multipart_uploads_unlisted": house.uploads_unlisted,
            "claims": report.claims_removed,
        },
        "notices": report.notices,
    })
}
