//! `base-push`: takes a base backup with pg_basebackup, streamed into the repository.

use std::time::Instant;

use clap::Parser;
use walship::base::{self, BackupType, IncrementalOptions, PushOptions};
use walship::log::Log;
use walship::{Error, retry};
use walship_cli::{COMMON_HELP, CommonArgs};

#[derive(Parser, Debug)]
#[command(
    name = "base-push",
    version,
    about = "Take a base backup with pg_basebackup, streamed into a walship repository",
    long_about = "Take a base backup with pg_basebackup, streamed into a walship repository.\n\n\
        Runs `pg_basebackup -D - -Ft -X fetch` (from pg_bin_dir or PATH), connecting as libpq's \
        environment (PGHOST, PGPORT, PGUSER, ~/.pgpass...) and any options after `--` say, and \
        stores its tar stream compressed (zstd, on every core) and checksummed (SHA-256) in parts, \
        without a local copy. The WAL that makes the backup consistent is part of it, and so is its \
        backup_manifest. The backup's catalog record is written last: a backup cut short does not \
        exist for base-list and base-fetch, and the next base-push removes what it left.\n\n\
        Prints the backup's name on stdout. Progress goes to stderr: a bar on a terminal, a line \
        every progress_interval_secs otherwise.\n\n\
        With --incremental (PostgreSQL 17 and later, with summarize_wal = on on the server), only \
        what changed since a parent backup is copied: the parent is --from NAME, else the newest \
        complete backup of this cluster on the newest timeline the repository knows, and its stored \
        backup_manifest is handed to pg_basebackup --incremental. base-fetch restores such a backup \
        by combining its chain (pg_combinebackup). Without a usable parent, on an older server or \
        without WAL summaries, base-push fails with one line saying why (exit 1 no usable parent, \
        10 server or pg_basebackup cannot, 6 parent of another cluster), or with --full-if-needed \
        takes a full backup instead and says so.\n\n\
        Example (cron, as postgres: a full backup on Sunday, incremental ones on the other days):\n    \
        0 3 * * 0    base-push --config /etc/walship/walship.toml -- --checkpoint=fast\n    \
        0 3 * * 1-6  base-push --config /etc/walship/walship.toml --incremental --full-if-needed -- --checkpoint=fast",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// Pin the new backup: base-expire keeps it forever (unpin with base-expire --unpin NAME)
    #[arg(long)]
    pin: bool,

    /// Take an incremental backup (PostgreSQL 17+, summarize_wal = on): only what changed since the
    /// parent, the newest complete backup of this cluster (or --from NAME)
    #[arg(long)]
    incremental: bool,

    /// The parent of the incremental backup: a name from base-list
    #[arg(long, value_name = "NAME", requires = "incremental")]
    from: Option<String>,

    /// With --incremental: take a full backup instead, saying why, when no incremental one can be
    /// taken (no usable parent, a server older than 17, summarize_wal off)
    #[arg(long, requires = "incremental")]
    full_if_needed: bool,

    /// Extra pg_basebackup options, after `--` (for example -h HOST -U USER --checkpoint=fast
    /// --max-rate=100M). -D, -F, -X, -z, -Z, -R, -T, -l, -t, -P, --no-manifest and --incremental are
    /// base-push's own.
    #[arg(last = true, value_name = "PG_BASEBACKUP_ARGS")]
    pg_basebackup_args: Vec<String>,
}

fn main() {
    walship_cli::exit_on_panic("base-push", |code| code as u8);
    let cli: Cli = walship_cli::parse_or_exit("base-push", |code| code as u8);
    let log = Log::new("base-push", cli.common.verbose);
    let started = Instant::now();
    let result = walship_cli::block_on(async {
        let config = cli.common.load_config()?;
        log.debug(format_args!("repository {}, {:?}", config.repo, config.base));
        let options = PushOptions {
            pg_bin_dir: config.pg_bin_dir.clone(),
            extra_args: cli.pg_basebackup_args.clone(),
            part_size: config.base.part_size,
            compression_level: config.compression_level,
            compression_workers: config.base.compression_workers,
            transfer_concurrency: config.base.transfer_concurrency,
            idle_timeout: config.deadline,
            spool_dir: config.base.spool_dir.clone(),
            incremental: cli
                .incremental
                .then(|| IncrementalOptions { from: cli.from.clone(), full_if_needed: cli.full_if_needed }),
        };
        // A backup runs for hours: deadline_secs bounds each transfer's lack of progress instead.
        walship_cli::on_repository(&config, &log, async |repo, _deadline| {
            let progress = walship_cli::progress("base-push", config.base.progress_interval);
            let result = base::base_push(repo, &options, progress.as_ref(), &log).await;
            drop(progress);
            let record = result?;
            if cli.pin {
                // After the record: a new backup is the newest, which no expiry deletes meanwhile.
                retry::with_deadline(config.deadline, &log, repo.url(), || base::set_pinned(repo, &record.name, true))
                    .await
                    .map_err(|e| unpinned(&record.name, e))?;
            }
            Ok(record)
        })
        .await
    });
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(record) => {
            let parts: usize = record.archives.iter().map(|a| a.parts.len()).sum();
            let kind = match (&record.backup_type, &record.parent) {
                (BackupType::Incremental, Some(parent)) => format!("incremental on top of {parent}"),
                _ => "full".to_owned(),
            };
            log.info(format_args!(
                "backup {} complete ({kind}): {} bytes, stored {} in {parts} parts, LSN {} to {} on timeline {}, {seconds:.1} s \
                 ({:.1} MB/s)",
                record.name,
                record.original_bytes,
                record.stored_bytes,
                record.start_lsn,
                record.stop_lsn,
                record.timeline,
                record.original_bytes as f64 / 1e6 / seconds.max(0.001)
            ));
            walship_cli::print_result_line(&record.name);
            std::process::exit(0);
        }
        Err(e) => walship_cli::exit_with(&log, &e),
    }
}

/// A pin that failed after the backup completed: the error says the backup is there, unpinned.
fn unpinned(name: &str, error: Error) -> Error {
    Error::Storage(walship::storage::StorageError::Other {
        location: name.to_owned(),
        message: format!(
            "backup {name} is complete but could not be pinned ({error}); pin it with base-expire --pin {name}"
        ),
        retryable: false,
    })
}
