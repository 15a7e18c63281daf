//! What every walship command does around its real work: parse the common flags, load the
//! configuration, run a one-shot current-thread runtime, and exit with the documented code.
//!
//! Kept apart from the `walship` library so that the library knows nothing of argument parsing.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};
use walship::log::Log;
use walship::repo::Repository;
use walship::retry::{self, Deadline};
use walship::{Config, ConfigFlags, Error, ExitCode};

/// Configuration keys, environment and exit codes, appended to every command's `--help`.
pub const COMMON_HELP: &str = "\
Configuration file keys (TOML; unknown keys are an error):
  repo = \"file:///var/lib/walship\"    repository (an absolute path also works)
  compression_level = 1               zstd level for new objects, -7 to 19
  deadline_secs = 120                 how long one command retries transient failures (base
                                      backups: how long a transfer may make no progress)
  pg_bin_dir = \"/usr/lib/postgresql/15/bin\"   where PostgreSQL's programs are [default: PATH, then
                                      /usr/lib/postgresql/V/bin, /usr/pgsql-V/bin]; pg_verifybackup,
                                      postgres and psql must be the backup's major version V
  [base] part_size = \"256MiB\"         bytes of the backup stream per stored part
  [base] compression_workers = 0      zstd threads compressing a base backup (0: one per core)
  [base] transfer_concurrency = 4     parts downloaded at once (base-fetch), parts completing at
                                      once (base-push)
  [base] progress_interval_secs = 30  how often progress is logged when stderr is not a terminal
  [base] spool_dir = \"/tmp\"           where a backup with extra tablespaces is spooled (needs its
                                      full size free) [default: $TMPDIR or /tmp]
  [push] look_ahead = 16               wal-push: later .ready segments uploaded ahead per call
                                      (0: off); later calls answer from pg_wal/walship/pushed/
  [push] parallel = 4                 wal-push: segments uploaded at once
  [fetch] prefetch = 16               wal-fetch: segments kept prefetched during a recovery, in
                                      pg_wal/walship/prefetch/ (0: off)
  [fetch] parallel = 4                wal-fetch: segments the prefetch worker downloads at once
  [fetch] prefetch_idle_secs = 30     the prefetch worker exits after this long without a request
  [retention] keep = 7                base-expire: keep the 7 newest complete backups
  [retention] keep_within = \"14d\"     base-expire: keep what a recovery into the last 14 days
                                      needs (s, m, h, d, w); with keep, kept if either keeps it
  [retention] abandoned_after = \"24h\" base-expire: temporary files and multipart uploads older
                                      than this are removed
  [encryption] recipients = [\"age1...\"]   public keys new objects are encrypted for (walship-key
                                      generate makes a pair); none: objects are written plain
  [encryption] identity_files = [\"/etc/walship/keys/2026.key\"]   private keys tried when reading,
                                      old and new (each readable by its owner only)
  [encryption] passphrase_file = \"/etc/walship/passphrase\"   instead of recipients: a long random
                                      passphrase (20+ characters; walship-key passphrase)
  [encryption] passphrase_work_factor = 10   scrypt work factor (log2 N, 1-20) for passphrase writes
  [encryption] accept_plain = false   also read objects written before the repository was encrypted
  [s3] conditional_writes = \"warn\"   on an S3 store that ignores If-None-Match (probed when the
                                      repository is made): warn once per process; \"accept\": no
                                      warning; \"require\": refuse to write (exit 8)
  The other [s3] keys and the [ssh] table: see README.

Environment: WALSHIP_REPO (repository URL), WALSHIP_CONFIG (configuration file).
Precedence: --repo, then WALSHIP_REPO, then the file's repo.

Exit codes (shared by all walship commands):
  0  success
  1  not found: the archive does not have the file (wal-fetch)
  2  usage: wrong arguments
  3  configuration: unreadable file, unknown key, bad value, no repository
  4  invalid input: bad name, not a WAL file, or a file that does not match its name
  5  conflict: different content is already archived under this name (nothing overwritten)
  6  wrong repository: another cluster's, not a walship repository, or a newer format
  7  corrupt: a stored object failed verification (it is never handed over)
  8  storage: the repository failed or was unreachable until the deadline (or an S3 store
     ignores conditional writes where [s3] conditional_writes = \"require\")
  9  local file: reading the file to archive or writing the restored file failed
 10  a PostgreSQL program (pg_basebackup, pg_verifybackup, postgres, psql) failed or could not
     be run (not installed, no connection, only another major version than the backup's)
 11  interrupted by SIGINT, SIGTERM or SIGHUP (what was written was removed)
 12  internal error: a bug in walship (it panicked)
 13  problems found (wal-verify, base-verify): the check ran and found gaps, a stale archive,
     damaged objects or a failed restore test; every other non-zero code means it could not check
 14  encryption: no configured key opens an object (wrong or missing key), or the repository's
     encryption and the configuration disagree (nothing was written, nothing handed over)
wal-fetch adds 200 to codes 2-14 (202-214) so that PostgreSQL stops a point-in-time recovery
instead of ending it early; where the working directory holds standby.signal it exits 1 instead,
and the standby retries.";

/// The flags every command takes.
#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// Configuration file (TOML) [default: $WALSHIP_CONFIG, else /etc/walship/walship.toml if it exists]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Repository, overriding the configuration: file:///path or /path [env: WALSHIP_REPO]
    #[arg(long, value_name = "URL")]
    pub repo: Option<String>,

    /// Log more detail (settings, retries) to stderr
    #[arg(short, long)]
    pub verbose: bool,
}

impl CommonArgs {
    /// The configuration these flags, the environment and the file say.
    pub fn load_config(&self) -> Result<Config, Error> {
        Config::load(&ConfigFlags { config_file: self.config.clone(), repo: self.repo.clone() })
    }

    /// restore_command for a server that `program` (base-fetch, base-verify) restores: the
    /// wal-fetch installed beside it, reading the same repository as this run. The server's
    /// environment differs from ours, so settings that came from flags or the environment are
    /// written out as flags.
    pub fn restore_command(&self, config: &Config, program: &str) -> Result<String, Error> {
        use walship::config::{ENV_CONFIG, ENV_REPO};
        let exe = std::env::current_exe()
            .map_err(|e| Error::local_io(std::path::Path::new("/proc/self/exe"), "resolve", e))?;
        let wal_fetch = exe.with_file_name("wal-fetch");
        if !wal_fetch.is_file() {
            return Err(Error::Config {
                source_name: wal_fetch.display().to_string(),
                message: format!("wal-fetch is not installed beside {program}; install both from the same build"),
            });
        }
        let set = |flag: bool, var: &str| flag || std::env::var_os(var).is_some_and(|v| !v.is_empty());
        let mut arguments = Vec::new();
        if set(self.config.is_some(), ENV_CONFIG)
            && let Some(file) = &config.source_file
        {
            arguments.push("--config".to_owned());
            arguments.push(absolute(file)?.display().to_string());
        }
        if set(self.repo.is_some(), ENV_REPO) {
            arguments.push("--repo".to_owned());
            arguments.push(config.repo.to_string());
        }
        Ok(walship::base::restore_command(&wal_fetch, &arguments))
    }
}

/// Makes a panic (a bug) end the command with `code_of(ExitCode::Internal)` and one log line, from
/// whichever thread it happens on. Rust's own exit code for a panic, 101, is below 126, which
/// PostgreSQL reads from restore_command as "file not in the archive": recovery would end early
/// and promote. Call it first thing in `main`.
pub fn exit_on_panic(program: &'static str, code_of: impl Fn(ExitCode) -> u8 + Send + Sync + 'static) {
    std::panic::set_hook(Box::new(move |info| {
        let code = code_of(ExitCode::Internal);
        let what = info.to_string().replace('\n', " ");
        walship::log::line(
            program,
            format_args!("internal error (a bug in walship; please report it): {what} (exit {code})"),
        );
        std::process::exit(i32::from(code));
    }));
}

/// Parses arguments; on `--help`/`--version` prints and exits 0, on a usage error prints one line and
/// exits with `usage_exit(ExitCode::Usage)`.
pub fn parse_or_exit<T: Parser>(program: &str, usage_exit: impl Fn(ExitCode) -> u8) -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            // clap's message runs over several lines up to a blank line and the usage; keep one line.
            let rendered = e.to_string();
            let message: Vec<&str> = rendered.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            walship::log::line(program, format_args!("error: {message} (see {program} --help)"));
            std::process::exit(i32::from(usage_exit(ExitCode::Usage)));
        }
    }
}

/// How long a command may spend undoing what interrupted attempts left open before exiting.
pub const CLEANUP_GRACE: Duration = Duration::from_secs(10);

/// The one deadline, retry and cleanup policy of every command (the prefetch worker included):
///
/// - one [`Deadline`], `config.deadline` from now, fixed before anything can wait;
/// - the repository opened within it, transient failures retried ([`retry::until`]);
/// - `work` given the repository and that deadline: what it does on the repository goes through
///   `retry::until(deadline, ..)`, so the deadline bounds the whole command and transient failures
///   are retried with backoff inside it. Base backups, which run for hours, are the exception the
///   configuration documents: there `deadline_secs` bounds how long one transfer may make no
///   progress, and `work` applies it per transfer;
/// - afterwards, whether the work succeeded or not, the repository gets [`CLEANUP_GRACE`] to undo
///   what interrupted attempts left on the server (multipart uploads cut off by the deadline,
///   temporary files of an attempt whose connection broke).
///
/// It lives here, not in the library, because it is what a command is; the library's own waits
/// (the prefetch worker's downloads, a base backup's parts) use the same [`retry::until`].
pub async fn on_repository<T>(
    config: &Config,
    log: &Log,
    work: impl AsyncFnOnce(&Repository, Deadline) -> Result<T, Error>,
) -> Result<T, Error> {
    let deadline = Deadline::starting_now(config.deadline);
    // Opening may wait on the network (S3's region and credential chain).
    let repo = retry::until(deadline, log, &config.repo.to_string(), || Repository::open(config)).await?;
    let repo = repo.with_log(log.clone());
    let result = work(&repo, deadline).await;
    if let Err(e) = repo.cleanup(CLEANUP_GRACE).await {
        log.debug(format_args!("cleaning up after interrupted attempts failed: {e}"));
    }
    result
}

/// File work runs on the blocking pool, one thread per transfer, and glibc gives each new thread a
/// malloc arena of its own that keeps what it freed (a zstd window, a transfer's buffers). Measured
/// on benches/wal-throughput.sh: with decoding and encoding off the runtime's threads, the prefetch
/// worker's peak RSS went from 20 to 41 MiB and a look-ahead push to S3 from 34 to 52 MiB; with two
/// arenas, 24 and 38.5 MiB at the same throughput (BENCHMARKS.md).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before the runtime starts a thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Runs one command's work to completion on a current-thread runtime.
pub fn block_on<T>(work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    run_to_completion(tokio::runtime::Builder::new_current_thread(), work)
}

/// Like [`block_on`], on `workers` threads (at most one per core): for work that moves several
/// files at once (a look-ahead batch, the prefetch worker). Their file reading, compressing and
/// decoding run on the blocking pool beside these threads.
pub fn block_on_parallel<T>(workers: usize, work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers.clamp(1, cores));
    run_to_completion(builder, work)
}

fn run_to_completion<T>(
    mut builder: tokio::runtime::Builder,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    limit_malloc_arenas();
    let runtime = builder.enable_all().build().map_err(|e| Error::LocalIo {
        path: "tokio runtime".into(),
        operation: "start",
        source: e,
    })?;
    let result = runtime.block_on(work);
    // A blocking file operation stuck on a hung file system must not keep us from exiting.
    runtime.shutdown_background();
    result
}

/// Progress of a long transfer: a bar on a terminal, a log line every `interval` otherwise (cron
/// mails and log files want a few lines, not a redrawn bar).
pub fn progress(program: &'static str, interval: std::time::Duration) -> std::sync::Arc<dyn walship::base::Progress> {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        std::sync::Arc::new(TerminalProgress::new())
    } else {
        std::sync::Arc::new(LogProgress {
            program,
            interval,
            started: std::time::Instant::now(),
            last: std::sync::Mutex::new(std::time::Instant::now()),
        })
    }
}

struct TerminalProgress {
    bar: indicatif::ProgressBar,
}

impl TerminalProgress {
    fn new() -> Self {
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} {bytes} ({binary_bytes_per_sec}) {msg}",
            )
            .expect("valid template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        TerminalProgress { bar }
    }
}

impl walship::base::Progress for TerminalProgress {
    fn update(&self, done: u64, stored: u64, total: Option<u64>) {
        if let Some(total) = total
            && self.bar.length() != Some(total)
        {
            self.bar.set_length(total);
            self.bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, eta {eta}) {msg}",
                )
                .expect("valid template"),
            );
        }
        self.bar.set_position(done);
        self.bar.set_message(format!("stored {}", indicatif::HumanBytes(stored)));
    }

    fn phase(&self, what: &str) {
        self.bar.set_message(what.to_owned());
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

struct LogProgress {
    program: &'static str,
    interval: std::time::Duration,
    started: std::time::Instant,
    last: std::sync::Mutex<std::time::Instant>,
}

impl walship::base::Progress for LogProgress {
    fn update(&self, done: u64, stored: u64, total: Option<u64>) {
        let Ok(mut last) = self.last.lock() else { return };
        if last.elapsed() < self.interval {
            return;
        }
        *last = std::time::Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let of_total = total.map(|t| format!(" of {}", indicatif::HumanBytes(t))).unwrap_or_default();
        walship::log::line(
            self.program,
            format_args!(
                "progress: {}{of_total} ({}/s), stored {}",
                indicatif::HumanBytes(done),
                indicatif::HumanBytes((done as f64 / seconds) as u64),
                indicatif::HumanBytes(stored)
            ),
        );
    }

    fn phase(&self, what: &str) {
        walship::log::line(self.program, what);
    }
}

/// Prints a command's result (a backup's name) on stdout for scripts. The work is done and durable
/// by now, so a stdout that cannot be written (closed by the reader) does not make it a failure,
/// and must not panic as `println!` would.
pub fn print_result_line(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// `bytes` for people: `512 B`, `1.5 MiB`, `2.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// Ends a verify command that could check: the metrics file written where one was asked for, each
/// finding as one line on stderr and a summary, then exit 0 when there is none, else
/// [`ExitCode::ProblemsFound`]. A metrics file that cannot be written is an error line, and turns a
/// healthy run's 0 into the write's own code (monitoring would go on reading a stale file); problems
/// found still exit 13.
pub fn finish_verify(
    log: &Log,
    findings: &[walship::verify::Finding],
    summary: &str,
    metrics: Option<(&std::path::Path, &walship::verify::metrics::Metrics)>,
) -> ! {
    let unwritten = metrics.and_then(|(path, figures)| figures.write(path).err());
    for finding in findings {
        log.info(format_args!("problem: {}: {}", finding.kind.label(), finding.message));
    }
    if findings.is_empty() {
        log.info(format_args!("healthy: {summary}"));
        if let Some(error) = &unwritten {
            exit_with(log, error);
        }
        std::process::exit(0);
    }
    if let Some(error) = &unwritten {
        log.info(format_args!("error: {error}"));
    }
    let code = ExitCode::ProblemsFound as u8;
    log.info(format_args!("{} problems found: {summary} (exit {code})", findings.len()));
    std::process::exit(i32::from(code));
}

/// Ends a verify command that could not check: the metrics file, where one was asked for, says so
/// (`walship_verify_completed 0`), then `error` with its own code.
pub fn could_not_check(
    log: &Log,
    command: &str,
    metrics: Option<&std::path::Path>,
    repository: &str,
    took: Duration,
    error: &Error,
) -> ! {
    if let Some(path) = metrics {
        let mut figures = walship::verify::metrics::Metrics::new(repository);
        walship::verify::metrics::set_outcome(&mut figures, command, None, took);
        if let Err(e) = figures.write(path) {
            log.info(format_args!("error: {e}"));
        }
    }
    exit_with(log, error)
}

/// `path` made absolute (against the working directory), for paths handed to another process.
pub fn absolute(path: &std::path::Path) -> Result<PathBuf, Error> {
    std::path::absolute(path).map_err(|e| Error::local_io(path, "resolve", e))
}

/// Logs `error` as one line and exits with its code.
pub fn exit_with(log: &Log, error: &Error) -> ! {
    let code = error.exit_code() as u8;
    log.info(format_args!("error: {error} (exit {code})"));
    std::process::exit(i32::from(code));
}
