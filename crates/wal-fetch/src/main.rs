//! `wal-fetch`: PostgreSQL's restore_command. Restores one WAL file, verified, or says it is absent.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use walship::Error;
use walship::log::Log;
use walship::repo::{self, Repository};
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
        working directory), which then simply retries.",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// The WAL file name to restore (PostgreSQL's %f)
    name: String,

    /// Where to write it (PostgreSQL's %p, relative to the data directory)
    path: PathBuf,
}

fn main() {
    // PostgreSQL runs restore_command in the data directory.
    let standby = Path::new("standby.signal").exists();
    let cli: Cli = walship_cli::parse_or_exit("wal-fetch", |code| code.for_restore(standby));
    let log = Log::new("wal-fetch", cli.common.verbose);
    let started = Instant::now();
    let result = walship_cli::block_on(async {
        let config = cli.common.load_config()?;
        log.debug(format_args!("repository {}, deadline {} s", config.repo, config.deadline.as_secs()));
        let repo = Repository::open(&config).await?;
        let what = repo.describe_wal(&cli.name);
        walship_cli::run_on_repository(&repo, &config, &log, &what, || repo::fetch(&repo, &cli.name, &cli.path)).await
    });
    let millis = started.elapsed().as_millis();
    match result {
        Ok(report) => {
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
        Err(e) => {
            let code = e.exit_code().for_restore(standby);
            let consequence =
                if standby { "standby: PostgreSQL will retry" } else { "recovery stops rather than ending early" };
            log.info(format_args!("error: {e} (exit {code}: {consequence})"));
            std::process::exit(i32::from(code));
        }
    }
}
