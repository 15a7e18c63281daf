//! `base-list`: the complete base backups in the repository, oldest first.

use std::cell::RefCell;
use std::io::Write;

use clap::Parser;
use walship::base::{self, BackupRecord, CatalogEntry};
use walship::log::Log;
use walship::repo::Repository;
use walship::{Error, retry};
use walship_cli::{COMMON_HELP, CommonArgs, human_bytes};

#[derive(Parser, Debug)]
#[command(
    name = "base-list",
    version,
    about = "List the complete base backups in a walship repository, newest last",
    long_about = "List the complete base backups in a walship repository, newest last.\n\n\
        One row per backup with a catalog record (a backup cut short has none and is not shown): \
        name, when it finished, its LSN range and timeline, its size and stored size, its type (full \
        or incremental) and parent (an incremental backup's, - for a full one), and `pinned` last for \
        a pinned backup. With --json, a JSON array of the full catalog records (see README, \
        \"Catalog record\") for scripts, each with backup_type, parent (null for a full backup) and \
        pinned.",
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
        walship_cli::on_repository(&config, &log, async |repo, deadline| {
            let listing = RefCell::new(Listing { json, started: false, count: 0, last_key: None });
            retry::until(deadline, &log, repo.url(), || list(repo, &listing)).await
        })
        .await
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

/// What the attempts so far printed. Rows are printed as they arrive, so a retry after a transient
/// failure midway must not print them again: the catalog is listed in key order, and a retry skips
/// the keys up to the last one printed.
struct Listing {
    json: bool,
    /// The header (or the opening bracket) is out.
    started: bool,
    count: u64,
    last_key: Option<String>,
}

/// One attempt at the listing. Prints as records arrive, so the output starts at once and memory
/// stays flat.
async fn list(repo: &Repository, listing: &RefCell<Listing>) -> Result<(), Error> {
    repo.require_identity().await?;
    let mut out = std::io::stdout().lock();
    let write_error = |e: std::io::Error| Error::local_io(std::path::Path::new("stdout"), "write", e);
    let json = listing.borrow().json;
    if !listing.borrow().started {
        if json {
            out.write_all(b"[").map_err(write_error)?;
        } else {
            writeln!(
                out,
                "{:<16}  {:<20}  {:>12}  {:>12}  {:>3}  {:>10}  {:>10}  {:<11}  {:<16}  PINNED",
                "NAME", "FINISHED", "START LSN", "STOP LSN", "TL", "SIZE", "STORED", "TYPE", "PARENT"
            )
            .map_err(write_error)?;
        }
        listing.borrow_mut().started = true;
    }
    base::for_each_entry(repo, |entry: CatalogEntry| {
        let Some(record) = entry.record else { return Ok(()) };
        let mut listing = listing.borrow_mut();
        let key = BackupRecord::catalog_key(&record.name);
        if listing.last_key.as_ref().is_some_and(|last| key <= *last) {
            return Ok(());
        }
        print_row(&mut out, &record, entry.pinned, json, listing.count).map_err(write_error)?;
        listing.count += 1;
        listing.last_key = Some(key);
        Ok(())
    })
    .await?;
    if json {
        out.write_all(if listing.borrow().count == 0 { b"]\n" } else { b"\n]\n" }).map_err(write_error)?;
    }
    out.flush().map_err(write_error)
}

/// One backup: a JSON record (the `index`th, for the separator) or a table row.
fn print_row(out: &mut impl Write, record: &BackupRecord, pinned: bool, json: bool, index: u64) -> std::io::Result<()> {
    if json {
        let separator = if index == 0 { "\n" } else { ",\n" };
        let mut value = serde_json::to_value(record).expect("plain struct serializes");
        value["pinned"] = serde_json::Value::Bool(pinned);
        // Always present, so that a script need not tell a missing key from a full backup.
        if value.get("parent").is_none() {
            value["parent"] = serde_json::Value::Null;
        }
        return write!(out, "{separator}{value}");
    }
    let finished = record.finished_at.split('.').next().unwrap_or(&record.finished_at).trim_end_matches('Z');
    let row = format!(
        "{:<16}  {:<20}  {:>12}  {:>12}  {:>3}  {:>10}  {:>10}  {:<11}  {:<16}  {}",
        record.name,
        format!("{finished}Z"),
        record.start_lsn,
        record.stop_lsn,
        record.timeline,
        human_bytes(record.original_bytes),
        human_bytes(record.stored_bytes),
        record.backup_type.as_str(),
        record.parent.as_deref().unwrap_or("-"),
        if pinned { "pinned" } else { "" }
    );
    writeln!(out, "{}", row.trim_end())
}
