//! `wal-push`: PostgreSQL's archive_command. Archives one WAL file durably, never overwriting, and
//! uploads the next segments waiting in `pg_wal/archive_status` ahead of PostgreSQL's calls for them.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use walship::Error;
use walship::log::Log;
use walship::lookahead::{self, Answer, StateDir};
use walship::repo::Repository;
use walship::wal::WalFileName;
use walship_cli::{COMMON_HELP, CommonArgs, exit_with};

#[derive(Parser, Debug)]
#[command(
    name = "wal-push",
    version,
    about = "Archive one WAL file into a walship repository (PostgreSQL's archive_command)",
    long_about = "Archive one WAL file into a walship repository (PostgreSQL's archive_command).\n\n\
        In postgresql.conf:\n    archive_mode = on\n    archive_command = 'wal-push %p %f'\n\n\
        Exits 0 only once the file is durably stored. A file archived before with identical content \
        is success; different content under the same name is refused (exit 5) and never overwritten.\n\n\
        Look-ahead: when PATH is in pg_wal, the call also uploads up to [push] look_ahead later \
        segments that PostgreSQL has marked .ready in pg_wal/archive_status, [push] parallel files at \
        a time, and records each durable upload in pg_wal/walship/pushed/. PostgreSQL's later call for \
        such a segment is answered after a local check (same file, same repository) without touching \
        the repository. The answer for the requested file always waits for its own durable upload.",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// The file to archive (PostgreSQL's %p, relative to the data directory)
    path: PathBuf,

    /// Its WAL file name (PostgreSQL's %f) [default: the file name of PATH]
    name: Option<String>,
}

fn main() {
    walship_cli::exit_on_panic("wal-push", |code| code as u8);
    let cli: Cli = walship_cli::parse_or_exit("wal-push", |code| code as u8);
    let log = Log::new("wal-push", cli.common.verbose);
    let name = cli
        .name
        .clone()
        .unwrap_or_else(|| cli.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let started = Instant::now();
    let config = cli.common.load_config().unwrap_or_else(|e| exit_with(&log, &e));
    if let Err(e) = WalFileName::parse(&name) {
        exit_with(&log, &Error::InvalidInput { file: name.clone(), reason: e.0 });
    }
    log.debug(format_args!(
        "repository {}, compression level {}, deadline {} s, look-ahead {} ({} at once)",
        config.repo,
        config.compression_level,
        config.deadline.as_secs(),
        config.push.look_ahead,
        config.push.parallel
    ));

    // The cheap local check comes before anything touches the network.
    let state = StateDir::for_source(&cli.path);
    if let Some(state) = &state {
        match state.answer(&name, &cli.path, &config.repository_identity()) {
            Answer::Archived { bytes, rehashed } => {
                let how = if rehashed { "same SHA-256" } else { "same file" };
                log.info(format_args!(
                    "{name} was archived ahead by an earlier call ({bytes} bytes, {how}, {} ms)",
                    started.elapsed().as_millis()
                ));
                std::process::exit(0);
            }
            Answer::NotAhead(reason) => log.debug(format_args!("{name}: {reason}")),
        }
    }

    let batch = walship_cli::block_on_parallel(config.push.parallel, async {
        let repo = Repository::open(&config).await?;
        let batch = lookahead::push_batch(&repo, &config, &log, &cli.path, &name, state.as_ref()).await;
        if let Err(e) = repo.cleanup(walship_cli::CLEANUP_GRACE).await {
            log.debug(format_args!("cleaning up after interrupted attempts failed: {e}"));
        }
        Ok(batch)
    });
    let batch = batch.unwrap_or_else(|e| exit_with(&log, &e));
    for (segment, error) in &batch.ahead_failed {
        log.info(format_args!("look-ahead: {segment} not uploaded ahead (PostgreSQL's own call will retry): {error}"));
    }
    let ahead = match (batch.ahead.first(), batch.ahead.last()) {
        (Some(first), Some(last)) if first == last => format!("; uploaded {first} ahead"),
        (Some(first), Some(last)) => format!("; uploaded {} ahead ({first} to {last})", batch.ahead.len()),
        _ => String::new(),
    };
    let millis = started.elapsed().as_millis();
    match batch.requested {
        Ok(report) => {
            walship::failpoint::hit("wal-push:archived");
            match report.stored_bytes {
                Some(stored) => log.info(format_args!(
                    "archived {name} ({} bytes, stored {stored}, {millis} ms){ahead}",
                    report.original_bytes
                )),
                None => log.info(format_args!(
                    "{name} was already archived with identical content ({} bytes, {millis} ms){ahead}",
                    report.original_bytes
                )),
            }
            std::process::exit(0);
        }
        Err(e) => exit_with(&log, &e),
    }
}
