//! `base-list`: the complete base backups in the repository, oldest first.

use std::io::Write;

use clap::Parser;
use walship::Error;
use walship::base::{self, BackupRecord};
use walship::log::Log;
use walship::repo::Repository;
use walship_cli::{COMMON_HELP, CommonArgs};

#[derive(Parser, Debug)]
#[command(
    name = "base-list",
    version,
    about = "List the complete base backups in a walship repository, newest last",
    long_about = "List the complete base backups in a walship repository, newest last.\n\n\
        One row per backup with a catalog record (a backup cut short has none and is not shown): \
        name, when it finished, its LSN range and timeline, its size and stored size. With --json, \
        a JSON array of the full catalog records (see README, \"Catalog record\") for scripts.",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// Print a JSON array of the catalog records instead of a table
    #[arg(long)]
    json: bool,
}

fn main() {
    walship_cli::exit_on_panic("base-list", |code| code as u8);
    let cli: Cli = walship_cli::parse_or_exit("base-list", |code| code as u8);
    let log = Log::new("base-list", cli.common.verbose);
    let json = cli.json;
    let result = walship_cli::block_on(async {
        let config = cli.common.load_config()?;
        let repo = Repository::open(&config).await?;
        // Rows are printed as they arrive, so a failure midway is not retried (it would print them
        // twice); the storage clients retry single requests themselves.
        tokio::time::timeout(config.deadline, list(&repo, json)).await.unwrap_or_else(|_| {
            Err(Error::DeadlineExceeded {
                what: repo.url().to_owned(),
                seconds: config.deadline.as_secs(),
                last: "listing the catalog did not finish in time".into(),
            })
        })
    });
    match result {
        Ok(()) => std::process::exit(0),
        // A reader that stopped early (| head) wanted no more; that is not a failure of ours.
        Err(Error::LocalIo { ref source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(0)
        }
        Err(e) => walship_cli::exit_with(&log, &e),
    }
}

/// Prints as records arrive, so the output starts at once and memory stays flat.
async fn list(repo: &Repository, json: bool) -> Result<(), Error> {
    repo.require_identity().await?;
    let mut out = std::io::stdout().lock();
    let mut count = 0u64;
    let write_error = |e: std::io::Error| Error::local_io(std::path::Path::new("stdout"), "write", e);
    if json {
        out.write_all(b"[").map_err(write_error)?;
    } else {
        writeln!(
            out,
            "{:<16}  {:<20}  {:>12}  {:>12}  {:>3}  {:>10}  {:>10}",
            "NAME", "FINISHED", "START LSN", "STOP LSN", "TL", "SIZE", "STORED"
        )
        .map_err(write_error)?;
    }
    base::for_each_backup(repo, |record: BackupRecord| {
        if json {
            let separator = if count == 0 { "\n" } else { ",\n" };
            let text = serde_json::to_string(&record).expect("plain struct serializes");
            write!(out, "{separator}{text}").map_err(write_error)?;
        } else {
            let finished = record.finished_at.split('.').next().unwrap_or(&record.finished_at).trim_end_matches('Z');
            writeln!(
                out,
                "{:<16}  {:<20}  {:>12}  {:>12}  {:>3}  {:>10}  {:>10}",
                record.name,
                format!("{finished}Z"),
                record.start_lsn,
                record.stop_lsn,
                record.timeline,
                human(record.original_bytes),
                human(record.stored_bytes)
            )
            .map_err(write_error)?;
        }
        count += 1;
        Ok(())
    })
    .await?;
    if json {
        out.write_all(if count == 0 { b"]\n" } else { b"\n]\n" }).map_err(write_error)?;
    }
    out.flush().map_err(write_error)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}
