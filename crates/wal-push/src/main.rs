//! `wal-push`: PostgreSQL's archive_command. Archives one WAL file durably, never overwriting.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use walship::Error;
use walship::log::Log;
use walship::repo::{self, Repository};
use walship_cli::{COMMON_HELP, CommonArgs};

#[derive(Parser, Debug)]
#[command(
    name = "wal-push",
    version,
    about = "Archive one WAL file into a walship repository (PostgreSQL's archive_command)",
    long_about = "Archive one WAL file into a walship repository (PostgreSQL's archive_command).\n\n\
        In postgresql.conf:\n    archive_mode = on\n    archive_command = 'wal-push %p %f'\n\n\
        Exits 0 only once the file is durably stored. A file archived before with identical content \
        is success; different content under the same name is refused (exit 5) and never overwritten.",
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
    let cli: Cli = walship_cli::parse_or_exit("wal-push", |code| code as u8);
    let log = Log::new("wal-push", cli.common.verbose);
    let name = cli
        .name
        .clone()
        .unwrap_or_else(|| cli.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let started = Instant::now();
    let result = walship_cli::block_on(async {
        let config = cli.common.load_config()?;
        log.debug(format_args!(
            "repository {}, compression level {}, deadline {} s",
            config.repo,
            config.compression_level,
            config.deadline.as_secs()
        ));
        let repo = Repository::open(&config).await?;
        let what = repo.describe_wal(&name);
        walship_cli::run_on_repository(&repo, &config, &log, &what, || {
            repo::push(&repo, &cli.path, &name, config.compression_level)
        })
        .await
    });
    let millis = started.elapsed().as_millis();
    match result {
        Ok(report) => {
            match report.stored_bytes {
                Some(stored) => log.info(format_args!(
                    "archived {name} ({} bytes, stored {stored}, {millis} ms)",
                    report.original_bytes
                )),
                None => log.info(format_args!(
                    "{name} was already archived with identical content ({} bytes, {millis} ms)",
                    report.original_bytes
                )),
            }
            std::process::exit(0);
        }
        Err(e) => exit_with(&log, &e),
    }
}

fn exit_with(log: &Log, error: &Error) -> ! {
    let code = error.exit_code() as u8;
    log.info(format_args!("error: {error} (exit {code})"));
    std::process::exit(i32::from(code));
}
