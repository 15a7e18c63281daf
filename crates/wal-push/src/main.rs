//! `wal-push`: PostgreSQL's archive_command. Archives one WAL file durably, never overwriting, and
//! uploads the next segments waiting in `pg_wal/archive_status` ahead of PostgreSQL's calls for them.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use walship::log::Log;
use walship::lookahead::{self, Answer, BatchReport, Lookup, StateDir};
use walship::remembered::Remembered;
use walship::repo::Repository;
use walship::retry::Deadline;
use walship::wal::WalFileName;
use walship::{Config, Error};
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
        such a segment is answered after a local check (same file, recorded less than 10 minutes ago) \
        and two small requests to the repository (its identity record: the same repository, not one \
        made anew at its location; and the object: still there). The answer for the requested file \
        always waits for its own durable upload. deadline_secs bounds the whole call, uploads ahead \
        included.\n\n\
        The data directory remembers the repository it archives into (walship/repositories/ in it): \
        a push into a location that held that repository and now holds none (a file system that is \
        not mounted) or another one is refused (exit 6) and writes nothing. To start a new \
        repository there on purpose, remove the file the error names.",
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

enum Outcome {
    /// Answered from a look-ahead record, confirmed against the repository.
    Answered {
        bytes: u64,
        rehashed: bool,
    },
    Pushed(BatchReport),
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

    let state = StateDir::for_source(&cli.path);
    forget_records_on_panic(state.clone());
    let call = Call { log, name, path: cli.path, state, started };
    // One deadline for the whole call: every upload, ahead or requested, and every read of the
    // repository ends by then.
    let outcome = walship_cli::block_on_parallel(config.push.parallel, async {
        walship_cli::on_repository(&config, &call.log, async |repo, deadline| call.run(repo, &config, deadline).await)
            .await
    });
    match outcome {
        Ok(Outcome::Answered { bytes, rehashed }) => {
            let how = if rehashed { "same SHA-256" } else { "same file" };
            call.log.info(format_args!(
                "{} was archived ahead by an earlier call ({bytes} bytes, {how}, {} ms)",
                call.name,
                call.started.elapsed().as_millis()
            ));
            std::process::exit(0);
        }
        Ok(Outcome::Pushed(batch)) => call.finish(batch),
        Err(e) => call.fail(&e),
    }
}

/// A panic (a bug, exit 12) ends a call as a failure too: no look-ahead record outlives it. Runs
/// before the hook `exit_on_panic` installed, which logs and exits.
fn forget_records_on_panic(state: Option<StateDir>) {
    let Some(state) = state else { return };
    let exit = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        state.forget_all();
        exit(info);
    }));
}

/// One call of archive_command.
struct Call {
    log: Log,
    name: String,
    path: PathBuf,
    state: Option<StateDir>,
    started: Instant,
}

impl Call {
    async fn run(&self, repo: &Repository, config: &Config, deadline: Deadline) -> Result<Outcome, Error> {
        let (log, name) = (&self.log, &self.name);
        let location = config.store_location();
        // The cheap local check first; a record that holds locally still needs the repository's id.
        let candidate = match self.state.as_ref().map(|s| s.lookup(name, &self.path, &location)) {
            Some(Lookup::Candidate(candidate)) => Some(candidate),
            Some(Lookup::NotAhead(reason)) => {
                log.debug(format_args!("{name}: {reason}"));
                None
            }
            None => None,
        };
        if let (Some(state), Some(candidate)) = (&self.state, candidate) {
            match state.confirm(candidate, repo, deadline, log).await {
                Answer::Archived { bytes, rehashed } => return Ok(Outcome::Answered { bytes, rehashed }),
                Answer::NotAhead(reason) => log.debug(format_args!("{name}: {reason}")),
            }
        }
        let remembered = self.state.as_ref().and_then(|s| Remembered::for_pg_wal(s.pg_wal(), &location));
        if let Some(remembered) = &remembered {
            remembered.check(repo, deadline, log).await?;
        }
        let batch = lookahead::push_batch(repo, config, log, deadline, &self.path, name, self.state.as_ref()).await;
        if let (Some(remembered), Ok(_)) = (&remembered, &batch.requested) {
            // Read by the push just made (and kept): no request.
            let identity = repo.identity().await.ok().flatten();
            if let Some(Err(e)) = identity.map(|identity| remembered.remember(&identity)) {
                log.info(format_args!("warning: {e}; this cluster cannot tell an empty location from its repository"));
            }
        }
        Ok(Outcome::Pushed(batch))
    }

    fn finish(&self, batch: BatchReport) -> ! {
        let (log, name) = (&self.log, &self.name);
        for (segment, error) in &batch.ahead_failed {
            log.info(format_args!(
                "look-ahead: {segment} not uploaded ahead (PostgreSQL's own call will retry): {error}"
            ));
        }
        let ahead = match (batch.ahead.first(), batch.ahead.last()) {
            (Some(first), Some(last)) if first == last => format!("; uploaded {first} ahead"),
            (Some(first), Some(last)) => format!("; uploaded {} ahead ({first} to {last})", batch.ahead.len()),
            _ => String::new(),
        };
        let millis = self.started.elapsed().as_millis();
        let report = match batch.requested {
            Ok(report) => report,
            Err(e) => self.fail(&e),
        };
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

    /// A failing call is when repositories get wiped or replaced: no look-ahead record outlives it.
    fn fail(&self, error: &Error) -> ! {
        if let Some(state) = &self.state {
            state.forget_all();
        }
        exit_with(&self.log, error)
    }
}
