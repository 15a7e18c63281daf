//! `wal-fetch`: PostgreSQL's restore_command. Restores one WAL file, verified, or says it is absent;
//! during a recovery it keeps the next segments prefetched by a detached worker (itself, re-run).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Parser;
use walship::log::Log;
use walship::prefetch::{self, Spool};
use walship::repo;
use walship::wal::{WalFileKind, WalFileName};
use walship::{Config, Error, retry};
use walship_cli::{COMMON_HELP, CommonArgs};

#[derive(Parser, Debug)]
#[command(
    name = "wal-fetch",
    version,
    about = "Restore one WAL file from a walship repository (PostgreSQL's restore_command)",
    long_about = "Restore one WAL file from a walship repository (PostgreSQL's restore_command).\n\n\
        In postgresql.conf (or postgresql.auto.conf) of the server being restored:\n    \
        restore_command = 'wal-fetch %f %p'\n\n\
        The file is verified against its checksum before it appears at PATH. Exit 1 means the archive \
        definitely does not have it. Any other failure exits above 125 so that PostgreSQL stops a \
        point-in-time recovery instead of ending it early, or 1 on a standby (standby.signal in the \
        working directory), which then simply retries.\n\n\
        Prefetch: during a recovery (postmaster.pid and recovery.signal or standby.signal in the \
        working directory), after a segment is restored a detached worker (this same program) fetches \
        the next [fetch] prefetch segments, [fetch] parallel at a time, verified, into \
        pg_wal/walship/prefetch/<recovery>/; the next calls take their file from there by rename. \
        The worker exits when recovery ends, when the server stops, or after [fetch] \
        prefetch_idle_secs without a new request, and removes its spool.",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// Run as the prefetch worker for the recovery in the working directory, serving the spool
    /// SPOOL (started by wal-fetch itself)
    #[arg(long, hide = true, value_name = "SPOOL")]
    prefetch_worker: Option<PathBuf>,

    /// The WAL file name to restore (PostgreSQL's %f)
    name: String,

    /// Where to write it (PostgreSQL's %p, relative to the data directory)
    path: PathBuf,
}

fn main() {
    // PostgreSQL runs restore_command in the data directory.
    let standby = Path::new("standby.signal").exists();
    walship_cli::exit_on_panic("wal-fetch", move |code| code.for_restore(standby));
    let cli: Cli = walship_cli::parse_or_exit("wal-fetch", |code| code.for_restore(standby));
    let log = Log::new("wal-fetch", cli.common.verbose);
    if let Some(spool_dir) = &cli.prefetch_worker {
        run_prefetch_worker(&cli, spool_dir, &log);
    }
    let started = Instant::now();
    let config = match cli.common.load_config() {
        Ok(config) => config,
        Err(e) => fail(&log, &e, standby),
    };
    let spool = prefetch_spool(&config, &cli.name, &cli.path);
    if let Some(spool) = &spool {
        match spool.take(&cli.name, &cli.path, config.deadline) {
            Ok(Some(bytes)) => {
                keep_prefetching(spool, &cli, &log);
                log.info(format_args!(
                    "restored {} ({bytes} bytes, prefetched, {} ms)",
                    cli.name,
                    started.elapsed().as_millis()
                ));
                std::process::exit(0);
            }
            Ok(None) => {}
            Err(e) => log.debug(format_args!("prefetch spool {}: {e}", spool.dir().display())),
        }
    }
    let result = walship_cli::block_on(async {
        log.debug(format_args!("repository {}, deadline {} s", config.repo, config.deadline.as_secs()));
        walship_cli::on_repository(&config, &log, async |repo, deadline| {
            let what = repo.describe_wal(&cli.name);
            retry::until(deadline, &log, &what, || repo::fetch(repo, &cli.name, &cli.path)).await
        })
        .await
    });
    let millis = started.elapsed().as_millis();
    match result {
        Ok(report) => {
            walship::failpoint::hit("wal-fetch:restored");
            if let Some(spool) = &spool {
                keep_prefetching(spool, &cli, &log);
            }
            log.info(format_args!(
                "restored {} ({} bytes, stored {}, {millis} ms)",
                cli.name, report.original_bytes, report.stored_bytes
            ));
            std::process::exit(0);
        }
        Err(Error::NotFound { name, .. }) => {
            log.info(format_args!("{name} is not in the archive"));
            std::process::exit(1);
        }
        Err(e) => fail(&log, &e, standby),
    }
}

fn fail(log: &Log, error: &Error, standby: bool) -> ! {
    let code = error.exit_code().for_restore(standby);
    let consequence =
        if standby { "standby: PostgreSQL will retry" } else { "recovery stops rather than ending early" };
    log.info(format_args!("error: {error} (exit {code}: {consequence})"));
    std::process::exit(i32::from(code));
}

/// The spool of the running recovery, when prefetch is on and `name` is a segment.
fn prefetch_spool(config: &Config, name: &str, destination: &Path) -> Option<Spool> {
    let is_segment = WalFileName::parse(name).is_ok_and(|w| w.kind() == WalFileKind::Segment);
    if config.fetch.prefetch == 0 || !is_segment {
        return None;
    }
    let data_dir = std::env::current_dir().ok()?;
    Spool::for_recovery(&data_dir, destination, &config.store_location())
}

/// Tells the worker where recovery is, and starts one if none is running.
fn keep_prefetching(spool: &Spool, cli: &Cli, log: &Log) {
    if let Err(e) = spool.set_want(&cli.name) {
        log.debug(format_args!("prefetch spool {}: {e}", spool.dir().display()));
        return;
    }
    if spool.worker_alive() {
        return;
    }
    spool.remove_others();
    // The running binary itself, not whatever PATH finds: PostgreSQL's PATH may lead elsewhere,
    // or to nothing.
    let mut worker = Command::new("/proc/self/exe");
    worker.arg0("wal-fetch");
    if let Some(config) = &cli.common.config {
        worker.arg("--config").arg(config);
    }
    if let Some(repo) = &cli.common.repo {
        worker.arg("--repo").arg(repo);
    }
    if cli.common.verbose {
        worker.arg("--verbose");
    }
    worker
        .arg("--prefetch-worker")
        .arg(spool.dir())
        .arg("--")
        .arg(&cli.name)
        .arg(&cli.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Its own process group: a Ctrl-C meant for a foreground server must not reach it, and it
        // watches the postmaster itself.
        .process_group(0);
    if let Err(e) = worker.spawn() {
        log.info(format_args!("prefetch: cannot start the worker: {e}"));
    }
}

fn run_prefetch_worker(cli: &Cli, spool_dir: &Path, log: &Log) -> ! {
    let outcome = (|| {
        let data_dir = std::env::current_dir().map_err(|e| Error::local_io(Path::new("."), "getcwd", e))?;
        let config = cli.common.load_config();
        let spool = config.as_ref().ok().and_then(|config| {
            Spool::for_recovery(&data_dir, &cli.path, &config.store_location()).filter(|s| s.dir() == spool_dir)
        });
        let Some(spool) = spool else {
            // Recovery ended (or the server went) before we started: nobody else would remove the
            // spool our starter created.
            prefetch::remove_unserved_spool(&data_dir, &cli.path, spool_dir);
            return config.map(|_| ());
        };
        let config = config?;
        let mut served = false;
        let worked = walship_cli::block_on_parallel(config.fetch.parallel, async {
            walship_cli::on_repository(&config, log, async |repo, _deadline| {
                served = true;
                // Each download gets a deadline of its own: the worker serves a whole recovery.
                prefetch::run_worker(repo.clone(), spool.clone(), config.fetch.clone(), config.deadline, log.clone())
                    .await
            })
            .await
        });
        if !served {
            // The repository did not open: nobody else would remove the spool our starter created.
            prefetch::remove_unserved_spool(&data_dir, &cli.path, spool.dir());
        }
        worked
    })();
    match outcome {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            log.info(format_args!("prefetch: worker stopped: {e}"));
            std::process::exit(1);
        }
    }
}
