//! `base-fetch`: restores a base backup into an empty data directory, with the recovery settings
//! that make `pg_ctl start` complete a point-in-time recovery.

use std::path::PathBuf;
use std::time::Instant;

use clap::{ArgGroup, Parser};
use walship::Error;
use walship::base::{self, FetchOptions, RecoveryTarget, TargetAction};
use walship::log::Log;
use walship_cli::{COMMON_HELP, CommonArgs};

#[derive(Parser, Debug)]
#[command(
    name = "base-fetch",
    version,
    about = "Restore a base backup into an empty data directory, ready for pg_ctl start",
    long_about = "Restore a base backup into an empty data directory, ready for pg_ctl start.\n\n\
        NAME is a backup name from base-list, or LATEST: the newest backup, or with --target-time or \
        --target-lsn the newest one that finished before the target. DATA_DIR must be empty or \
        absent; it is created with mode 0700. Parts are downloaded in parallel and every checksum is \
        verified before the restore is usable: until then global/pg_control is held back, and a \
        failure removes what was extracted. Then restore_command (this walship's wal-fetch, with the \
        same --config/--repo) and the target are written to postgresql.auto.conf, with \
        recovery.signal (or standby.signal with --standby), pg_verifybackup checks the result when \
        it is installed, and pg_control goes into place last. Tablespaces go back to their old \
        directories (which must be empty or absent) unless --tablespace-mapping says otherwise.\n\n\
        An incremental backup (base-push --incremental) is restored with its whole chain: each \
        backup of it, from the full one it rests on, is restored and checked into a scratch \
        directory (beside DATA_DIR, or --scratch-dir), pg_combinebackup of the backup's major \
        version combines them into DATA_DIR, and the result is checked and configured as above. \
        The scratch space needs every link's size free (and DATA_DIR's file system the result's, at \
        most as much again), checked before anything is downloaded; it is removed afterwards, also \
        on failure and on SIGINT, SIGTERM or SIGHUP (exit 11).\n\n\
        LATEST follows timelines: it picks only a backup on the target timeline (--target-timeline, \
        else the newest one with a history file in the repository) or on one of its ancestors before \
        the point where the target timeline branched off, never one of an abandoned branch.\n\n\
        Archiving is turned off in the restored cluster (archive_command = 'false'; archive_mode \
        stays, so WAL waits in pg_wal): a drill or a copy must never push its new timeline into the \
        repository of the cluster it came from. For a restore that is to become the new primary, \
        use --keep-archiving, or later set archive_command and reload. A backup taken from a \
        standby loses its standby.signal and primary_conninfo unless --standby is given.\n\n\
        Run it as the server's user (as root, files keep the owner recorded in the backup). \
        Then: pg_ctl -D DATA_DIR start.\n\n\
        Example:\n    base-fetch LATEST /var/lib/postgresql/15/main --target-time '2026-11-22 08:00:00+00'",
    after_long_help = COMMON_HELP,
    group(ArgGroup::new("target").args(["target_time", "target_lsn", "target_xid", "target_name", "target_immediate"]))
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// The backup to restore: a name from base-list, or LATEST
    name: String,

    /// The data directory to restore into (empty or absent)
    data_dir: PathBuf,

    /// Recover up to this time, with a time zone ('2026-11-22 08:00:00+00' or RFC 3339)
    #[arg(long, value_name = "TIME")]
    target_time: Option<String>,

    /// Recover up to this WAL location (X/Y)
    #[arg(long, value_name = "LSN")]
    target_lsn: Option<String>,

    /// Recover up to this transaction
    #[arg(long, value_name = "XID")]
    target_xid: Option<String>,

    /// Recover up to this restore point (pg_create_restore_point)
    #[arg(long, value_name = "NAME")]
    target_name: Option<String>,

    /// Stop as soon as the backup is consistent
    #[arg(long)]
    target_immediate: bool,

    /// What the server does at the target [default: promote]
    #[arg(long, value_name = "promote|pause|shutdown", requires = "target")]
    target_action: Option<String>,

    /// The timeline to follow: a number, latest or current [PostgreSQL's default: latest]. LATEST
    /// picks a backup on its history (with current: any backup, which stays on its own timeline)
    #[arg(long, value_name = "TLI|latest|current")]
    target_timeline: Option<String>,

    /// Restore as a standby (standby.signal) that follows the archive
    #[arg(long, conflicts_with = "target")]
    standby: bool,

    /// Keep the backup's archive_command/archive_library: for a restore that is to become the new
    /// primary, archiving into the same repository. Without it archiving is off in the restored
    /// cluster.
    #[arg(long)]
    keep_archiving: bool,

    /// Restore the tablespace that lived in OLDDIR into NEWDIR instead (repeatable). Without it a
    /// tablespace goes back where it was, which must be empty or absent.
    #[arg(long, value_name = "OLDDIR=NEWDIR")]
    tablespace_mapping: Vec<String>,

    /// Where an incremental backup's chain is restored before pg_combinebackup combines it (it
    /// needs every link's size free; removed afterwards) [default: DATA_DIR's parent directory]
    #[arg(long, value_name = "DIR")]
    scratch_dir: Option<PathBuf>,
}

fn main() {
    walship_cli::exit_on_panic("base-fetch", |code| code as u8);
    let cli: Cli = walship_cli::parse_or_exit("base-fetch", |code| code as u8);
    let log = Log::new("base-fetch", cli.common.verbose);
    let started = Instant::now();
    let result = walship_cli::block_on(async {
        let (target, action, timeline) = targets(&cli)?;
        let config = cli.common.load_config()?;
        let restore_command = cli.common.restore_command(&config, "base-fetch")?;
        log.debug(format_args!("restore_command = {restore_command}"));
        let data_dir = walship_cli::absolute(&cli.data_dir)?;
        let options = FetchOptions {
            name: cli.name.clone(),
            data_dir,
            target,
            action,
            timeline,
            standby: cli.standby,
            keep_archiving: cli.keep_archiving,
            restore_command,
            pg_bin_dir: config.pg_bin_dir.clone(),
            transfer_concurrency: config.base.transfer_concurrency,
            deadline: config.deadline,
            tablespace_mapping: tablespace_mapping(&cli.tablespace_mapping)?,
            scratch_dir: cli.scratch_dir.as_deref().map(walship_cli::absolute).transpose()?,
        };
        // A restore runs for hours: deadline_secs bounds each transfer (catalog read, part) instead.
        walship_cli::on_repository(&config, &log, async |repo, _deadline| {
            let progress = walship_cli::progress("base-fetch", config.base.progress_interval);
            let result = base::base_fetch(repo, &options, &progress, &log).await;
            drop(progress);
            result
        })
        .await
    });
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(report) => {
            let record = &report.record;
            match &report.verification {
                base::Verification::Passed(said) => log.info(format_args!("pg_verifybackup: {said}")),
                base::Verification::NotInstalled => {}
            }
            log.info(format_args!(
                "restored backup {} ({} bytes, LSN {} to {}) into {} in {seconds:.1} s ({:.1} MB/s); start it with: \
                 pg_ctl -D {} start",
                record.name,
                record.original_bytes,
                record.start_lsn,
                record.stop_lsn,
                cli.data_dir.display(),
                record.original_bytes as f64 / 1e6 / seconds.max(0.001),
                cli.data_dir.display()
            ));
            if let Some(full) = report.chain.first() {
                log.info(format_args!("combined a chain of {} backups, from {full}", report.chain.len()));
            }
            walship_cli::print_result_line(&record.name);
            std::process::exit(0);
        }
        Err(e) => walship_cli::exit_with(&log, &e),
    }
}

fn targets(cli: &Cli) -> Result<(RecoveryTarget, Option<TargetAction>, Option<String>), Error> {
    let target = if let Some(time) = &cli.target_time {
        RecoveryTarget::time(time)
    } else if let Some(lsn) = &cli.target_lsn {
        RecoveryTarget::lsn(lsn)
    } else if let Some(xid) = &cli.target_xid {
        RecoveryTarget::xid(xid)
    } else if let Some(name) = &cli.target_name {
        RecoveryTarget::name(name)
    } else if cli.target_immediate {
        Ok(RecoveryTarget::Immediate)
    } else {
        Ok(RecoveryTarget::End)
    }
    .map_err(Error::Usage)?;
    let action = match (&cli.target_action, &target) {
        (Some(text), _) => Some(TargetAction::parse(text).map_err(Error::Usage)?),
        // Reaching the target should finish the restore; PostgreSQL's own default is to pause.
        (None, RecoveryTarget::End) => None,
        (None, _) => Some(TargetAction::Promote),
    };
    let timeline = match cli.target_timeline.as_deref() {
        None => None,
        Some("latest") | Some("current") => cli.target_timeline.clone(),
        Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => Some(n.to_owned()),
        Some(other) => return Err(Error::Usage(format!("--target-timeline {other:?}: a number, latest or current"))),
    };
    Ok((target, action, timeline))
}

fn tablespace_mapping(args: &[String]) -> Result<Vec<(String, PathBuf)>, Error> {
    args.iter()
        .map(|arg| match arg.split_once('=') {
            Some((old, new)) if old.starts_with('/') && new.starts_with('/') => {
                Ok((old.to_owned(), PathBuf::from(new)))
            }
            _ => Err(Error::Usage(format!("--tablespace-mapping {arg:?}: expected OLDDIR=NEWDIR, both absolute"))),
        })
        .collect()
}
