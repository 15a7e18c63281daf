//! base-verify --restore-test: restore a backup into a scratch directory, start PostgreSQL on it,
//! run a check query, stop it and remove everything; each step timed, the sum up to "accepting
//! connections" being the measured RTO.
//!
//! The server is a child of base-verify, never daemonized, with a parent-death signal (SIGQUIT), so
//! a base-verify killed outright takes its server down with it; the next run removes the directory
//! ([`super::scratch`]). Everything that could make the server reach the outside is overridden on
//! its command line, which wins over every configuration file: no TCP listener, a private 0700 Unix
//! socket, archiving off, its own hba file (`local all all trust`, reachable by this user only),
//! no external pid file, no archive cleanup or recovery end commands. restore_command is wal-fetch,
//! which only reads the repository: a restore test never writes into it.
//!
//! Outcomes: a failure before recovery began (the server cannot bind, get shared memory, is the
//! wrong version, runs as root) means nothing is known of the backup: an error ("could not check").
//! A failure from then on (a damaged part, pg_verifybackup, missing WAL, a replay error, the check
//! query) is what the test is for: a [`FindingKind::RestoreTestFailed`] finding.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::scratch::{Scratch, clean_predecessors};
use super::{Finding, FindingKind};
use crate::base::{
    BackupRecord, FetchOptions, NoProgress, Progress, RecoveryTarget, Signals, TargetAction, base_fetch,
    find_tool_of_version,
};
use crate::error::Error;
use crate::log::Log;
use crate::prefetch::SPOOL_ROOT;
use crate::repo::Repository;

/// How a restore test runs.
#[derive(Debug, Clone)]
pub struct RestoreTestOptions {
    /// Where the scratch directory is made (`$TMPDIR` or /tmp by default).
    pub scratch_parent: PathBuf,
    /// Replay all archived WAL (the backup's timeline and its descendants) instead of stopping at
    /// the first consistent point.
    pub to_end: bool,
    /// The check statements, each run on its own by psql; empty: `select 1`.
    pub check_sql: Vec<String>,
    /// The database the checks connect to.
    pub check_database: String,
    /// How long the server may take to accept connections; `None`: no limit.
    pub timeout: Option<Duration>,
    /// The restore_command to write (this walship's wal-fetch, reading the same repository).
    pub restore_command: String,
    /// Where PostgreSQL's programs are; `None`: PATH and the packages' directories.
    pub pg_bin_dir: Option<PathBuf>,
    /// Parts downloaded at once.
    pub transfer_concurrency: usize,
    /// Retries of one transfer end after this long.
    pub deadline: Duration,
    /// The port the server's socket is named after (it listens on no TCP port).
    pub port: u16,
}

/// What a restore test found, and how long each step took.
#[derive(Debug, Clone, Default)]
pub struct RestoreTestReport {
    /// Each step that ran, in order: `download_and_extract`, `verify`, `replay`, `check`,
    /// `stop_and_cleanup`.
    pub steps: Vec<(&'static str, Duration)>,
    /// download_and_extract + verify + replay, when the server came to accept connections.
    pub rto: Option<Duration>,
    /// What the check statements printed (psql -At), one entry per statement.
    pub check_output: Vec<String>,
    /// Why the test failed; empty when it passed.
    pub findings: Vec<Finding>,
}

impl RestoreTestReport {
    /// Whether the restore test passed.
    pub fn healthy(&self) -> bool {
        self.findings.is_empty()
    }

    fn step(&self, name: &str) -> Option<Duration> {
        self.steps.iter().find(|(n, _)| *n == name).map(|(_, d)| *d)
    }
}

/// Restores `record` into a new scratch directory and checks that PostgreSQL starts on it; removes
/// every trace afterwards, also when interrupted (SIGINT, SIGTERM, SIGHUP: [`Error::Interrupted`]).
pub async fn restore_test(
    repo: &Repository,
    record: &BackupRecord,
    options: &RestoreTestOptions,
    log: &Log,
) -> Result<RestoreTestReport, Error> {
    clean_predecessors(&options.scratch_parent, log);
    let mut signals = Signals::new()?;
    let scratch = Scratch::create(&options.scratch_parent, &record.name, record.original_bytes)?;
    let mut run = Run { backup: record.name.clone(), scratch, server: None, report: RestoreTestReport::default() };
    log.info(format_args!("restore test of backup {} in {}", record.name, run.scratch.root().display()));
    let outcome = tokio::select! {
        outcome = run.steps(repo, record, options, log) => outcome,
        signal = signals.recv() => Err(Error::Interrupted { signal }),
    };
    let stopping = Instant::now();
    run.finish(log);
    let took = stopping.elapsed();
    log.info(format_args!("stop_and_cleanup: {:.1} s", took.as_secs_f64()));
    outcome?;
    let mut report = run.report;
    report.steps.push(("stop_and_cleanup", took));
    Ok(report)
}

/// One restore test's state: what [`Run::finish`] must undo whichever way the steps ended.
struct Run {
    /// The backup under test: every finding's subject.
    backup: String,
    scratch: Scratch,
    server: Option<Child>,
    report: RestoreTestReport,
}

impl Run {
    async fn steps(
        &mut self,
        repo: &Repository,
        record: &BackupRecord,
        options: &RestoreTestOptions,
        log: &Log,
    ) -> Result<(), Error> {
        self.scratch.check_socket_path(options.port)?;
        // Before the download: a missing or wrong server is the cheaper mistake to report.
        let postgres = postgres_of(options.pg_bin_dir.as_deref(), record.pg_version)?;
        let psql = Psql::find(record.pg_version, options)?;
        if !self.restore(repo, record, options, log).await? {
            return Ok(());
        }
        self.prepare_config()?;
        self.drop_backup_wal()?;
        let started = Instant::now();
        self.server = Some(self.start(&postgres, options.port)?);
        let ready = self.wait_until_ready(&postgres, &psql, options.timeout).await?;
        let replay = started.elapsed();
        self.time("replay", replay, log);
        if !ready {
            return Ok(());
        }
        let restored = self.report.step("download_and_extract").unwrap_or_default();
        let verified = self.report.step("verify").unwrap_or_default();
        self.report.rto = Some(restored + verified + replay);
        let checking = Instant::now();
        self.check(&psql).await?;
        self.time("check", checking.elapsed(), log);
        Ok(())
    }

    fn time(&mut self, step: &'static str, took: Duration, log: &Log) {
        log.info(format_args!("{step}: {:.1} s", took.as_secs_f64()));
        self.report.steps.push((step, took));
    }

    fn fail(&mut self, message: String) {
        let message = format!("backup {}: {message}", self.backup);
        self.report.findings.push(Finding::new(FindingKind::RestoreTestFailed, self.backup.clone(), message));
    }

    /// base-fetch into the scratch directory. `false`: the restore failed, a finding says why.
    async fn restore(
        &mut self,
        repo: &Repository,
        record: &BackupRecord,
        options: &RestoreTestOptions,
        log: &Log,
    ) -> Result<bool, Error> {
        let (target, action, timeline) = if options.to_end {
            (RecoveryTarget::End, None, None)
        } else {
            // Any backup, on its own timeline: the first consistent point is on it.
            (RecoveryTarget::Immediate, Some(TargetAction::Promote), Some("current".to_owned()))
        };
        let fetch = FetchOptions {
            name: record.name.clone(),
            data_dir: self.scratch.data_dir(),
            target,
            action,
            timeline,
            standby: false,
            keep_archiving: false,
            restore_command: options.restore_command.clone(),
            pg_bin_dir: options.pg_bin_dir.clone(),
            transfer_concurrency: options.transfer_concurrency,
            deadline: options.deadline,
            tablespace_mapping: record
                .archives
                .iter()
                .filter_map(|a| a.tablespace.as_ref())
                .map(|t| (t.location.clone(), self.scratch.tablespace_dir(t.oid)))
                .collect(),
            scratch_dir: None,
        };
        if !fetch.tablespace_mapping.is_empty() {
            let dir = self.scratch.root().join("tablespaces");
            fs::create_dir(&dir).map_err(|e| Error::local_io(&dir, "create", e))?;
        }
        let progress: Arc<dyn Progress> = Arc::new(NoProgress);
        match base_fetch(repo, &fetch, &progress, log).await {
            Ok(report) => {
                self.time("download_and_extract", report.download_and_extract, log);
                self.time("verify", report.verify, log);
                Ok(true)
            }
            Err(e @ Error::Corrupt { .. }) => {
                self.fail(format!("the restore failed: {e}"));
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The configuration files the server reads besides its command line: an empty postgresql.conf
    /// where the backup has none (Debian keeps it in /etc), and this test's own hba and ident files.
    fn prepare_config(&self) -> Result<(), Error> {
        let conf = self.scratch.data_dir().join("postgresql.conf");
        if !conf.exists() {
            fs::write(&conf, "").map_err(|e| Error::local_io(&conf, "write", e))?;
        }
        for (name, content) in [("pg_hba.conf", "local all all trust\n"), ("pg_ident.conf", "")] {
            let path = self.scratch.root().join(name);
            fs::write(&path, content).map_err(|e| Error::local_io(&path, "write", e))?;
        }
        Ok(())
    }

    /// Removes the WAL segments the backup carries in pg_wal (pg_basebackup -X fetch; pg_verifybackup
    /// has checked them by now), so that recovery reads every segment from the repository through
    /// wal-fetch: the test proves the archive's WAL for the backup and the restore_command path, as
    /// a recovery beyond the backup needs them, not only the backup's own copy.
    fn drop_backup_wal(&self) -> Result<(), Error> {
        let pg_wal = self.scratch.data_dir().join("pg_wal");
        let is_segment = |name: &str| name.len() >= 24 && name.as_bytes()[..24].iter().all(u8::is_ascii_hexdigit);
        for dir in [pg_wal.clone(), pg_wal.join("archive_status")] {
            let entries = fs::read_dir(&dir).map_err(|e| Error::local_io(&dir, "read", e))?;
            for entry in entries.flatten() {
                let name = entry.file_name();
                let is_file = entry.file_type().is_ok_and(|t| t.is_file());
                if is_file && name.to_str().is_some_and(is_segment) && !name.to_string_lossy().ends_with(".history") {
                    fs::remove_file(entry.path()).map_err(|e| Error::local_io(&entry.path(), "remove", e))?;
                }
            }
        }
        Ok(())
    }

    /// Starts `postgres` as a child that dies with this process, its output in the scratch log.
    fn start(&self, postgres: &Path, port: u16) -> Result<Child, Error> {
        let data = self.scratch.data_dir();
        let root = self.scratch.root();
        let log_path = root.join("postgres.log");
        let log_file = fs::File::create(&log_path).map_err(|e| Error::local_io(&log_path, "create", e))?;
        let stderr = log_file.try_clone().map_err(|e| Error::local_io(&log_path, "open", e))?;
        let mut command = Command::new(postgres);
        command.arg("-D").arg(&data);
        let settings = [
            format!("data_directory={}", data.display()),
            "listen_addresses=".into(),
            format!("unix_socket_directories={}", self.scratch.socket_dir().display()),
            format!("port={port}"),
            "archive_mode=off".into(),
            format!("hba_file={}", root.join("pg_hba.conf").display()),
            format!("ident_file={}", root.join("pg_ident.conf").display()),
            // Not the backed-up server's: the live one's pid file would be overwritten.
            format!("external_pid_file={}", root.join("postgres.external.pid").display()),
            "logging_collector=off".into(),
            "log_destination=stderr".into(),
            "recovery_end_command=".into(),
            "archive_cleanup_command=".into(),
        ];
        for setting in settings {
            command.arg("-c").arg(setting);
        }
        command.current_dir(&data).stdin(Stdio::null()).stdout(log_file).stderr(stderr).process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls (getppid, prctl).
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the signal was armed.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("base-verify exited"));
                }
                Ok(())
            });
        }
        command.spawn().map_err(|e| Error::ToolFailed {
            tool: postgres.display().to_string(),
            reason: format!("cannot start: {e}"),
        })
    }

    /// Waits until postmaster.pid says "ready" (as pg_ctl does) and recovery has ended, the server
    /// exits, or the timeout passes. `false`: the server did not come up, and a finding says why.
    async fn wait_until_ready(
        &mut self,
        postgres: &Path,
        psql: &Psql,
        timeout: Option<Duration>,
    ) -> Result<bool, Error> {
        let started = Instant::now();
        let data = self.scratch.data_dir();
        loop {
            let child = self.server.as_mut().expect("started");
            if let Ok(Some(status)) = child.try_wait() {
                self.server = None;
                return self.exited(postgres, status);
            }
            // A hot standby says "ready" once consistent; recovery is ending once recovery.signal is
            // gone, and has ended (promoted) once the server says it is out of recovery.
            if postmaster_status(&data).as_deref() == Some("ready")
                && !data.join("recovery.signal").exists()
                && psql.run(&self.scratch.socket_dir(), "select pg_is_in_recovery()").await?.as_deref() == Ok("f")
            {
                return Ok(true);
            }
            if let Some(limit) = timeout.filter(|t| started.elapsed() > *t) {
                let waited = limit.as_secs_f64();
                let last = last_lines(&self.scratch.root().join("postgres.log"), &["LOG:", "FATAL:", "PANIC:"], 1);
                self.fail(format!("the server did not accept connections within {waited} s (--timeout){last}"));
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The server exited before accepting connections: a finding once recovery had begun, else an
    /// error (nothing was learnt about the backup).
    fn exited(&mut self, postgres: &Path, status: std::process::ExitStatus) -> Result<bool, Error> {
        let log_path = self.scratch.root().join("postgres.log");
        let mut why = last_lines(&log_path, &["FATAL:", "PANIC:", "wal-fetch: error", "is not in the archive"], 3);
        if why.is_empty() {
            // Refusals before logging starts ("root" execution...) have no severity; their first
            // lines say it.
            let said = fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = said.lines().map(str::trim).filter(|l| !l.is_empty()).take(2).collect();
            if !lines.is_empty() {
                why = format!(": {}", lines.join(" "));
            }
        }
        let began = fs::read_to_string(&log_path).is_ok_and(|text| {
            ["starting point-in-time recovery", "starting archive recovery", "redo starts at", "restored log file"]
                .iter()
                .any(|marker| text.contains(marker))
        });
        let message = format!("the server exited ({status}) before accepting connections{why}");
        if !began {
            return Err(Error::ToolFailed { tool: postgres.display().to_string(), reason: message });
        }
        self.fail(format!("recovery failed: {message}"));
        Ok(false)
    }

    /// Runs each check statement with psql over the private socket.
    async fn check(&mut self, psql: &Psql) -> Result<(), Error> {
        let default = ["select 1".to_owned()];
        let statements = if psql.check_sql.is_empty() { &default[..] } else { &psql.check_sql[..] };
        for sql in statements {
            match psql.run(&self.scratch.socket_dir(), sql).await? {
                Ok(said) => self.report.check_output.push(said),
                Err(error) => {
                    self.fail(format!("check {sql:?} failed: {error}"));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Stops the server, waits for wal-fetch's prefetch worker to let go of its spool, and removes
    /// the scratch directory.
    fn finish(&mut self, log: &Log) {
        if let Some(mut child) = self.server.take() {
            stop_child(&mut child, log);
        }
        wait_for_prefetch_worker(&self.scratch.data_dir().join("pg_wal").join(SPOOL_ROOT));
        self.scratch.remove();
    }
}

/// psql of the backup's version, pointed at the restored server.
struct Psql {
    path: PathBuf,
    port: u16,
    database: String,
    check_sql: Vec<String>,
}

impl Psql {
    fn find(pg_version: u32, options: &RestoreTestOptions) -> Result<Psql, Error> {
        let path = find_tool_of_version(options.pg_bin_dir.as_deref(), "psql", pg_version)?.ok_or_else(|| {
            Error::ToolFailed {
                tool: "psql".into(),
                reason: format!("PostgreSQL {pg_version}'s psql is not installed"),
            }
        })?;
        let (port, database, check_sql) = (options.port, options.check_database.clone(), options.check_sql.clone());
        Ok(Psql { path, port, database, check_sql })
    }

    /// Runs `sql` over the socket in `socket_dir`: what it printed (-At), or what it said on failure.
    async fn run(&self, socket_dir: &Path, sql: &str) -> Result<Result<String, String>, Error> {
        let output = tokio::process::Command::new(&self.path)
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-A", "-t", "-h"])
            .arg(socket_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-d")
            .arg(&self.database)
            .arg("-c")
            .arg(sql)
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| Error::ToolFailed {
                tool: self.path.display().to_string(),
                reason: format!("cannot run: {e}"),
            })?;
        if output.status.success() {
            return Ok(Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_owned()));
        }
        let error = String::from_utf8_lossy(&output.stderr).trim().replace('\n', "; ");
        Ok(Err(format!("{} ({})", error, output.status)))
    }
}

/// The `postgres` of the backup's major version, chosen by its `--version`.
fn postgres_of(pg_bin_dir: Option<&Path>, pg_version: u32) -> Result<PathBuf, Error> {
    find_tool_of_version(pg_bin_dir, "postgres", pg_version)?.ok_or_else(|| Error::ToolFailed {
        tool: "postgres".into(),
        reason: format!("PostgreSQL {pg_version}'s server is not installed (or set pg_bin_dir in the configuration)"),
    })
}

/// The status line of postmaster.pid (its 8th): `starting`, `standby`, `ready`, `stopping`.
fn postmaster_status(data_dir: &Path) -> Option<String> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().nth(7).map(|l| l.trim().to_owned())
}

/// The last `count` lines of the log that contain one of `markers`, as "; "-joined text after ": ".
fn last_lines(log: &Path, markers: &[&str], count: usize) -> String {
    let Ok(file) = fs::File::open(log) else { return String::new() };
    let mut kept: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        if line.trim().is_empty() {
            continue;
        }
        if markers.iter().any(|m| line.contains(m)) {
            if kept.len() == count {
                kept.pop_front();
            }
            kept.push_back(line.trim().to_owned());
        }
    }
    if kept.is_empty() { String::new() } else { format!(": {}", Vec::from(kept).join("; ")) }
}

/// Fast shutdown (SIGINT), then SIGQUIT, then SIGKILL, each given time to work; reaps the child.
fn stop_child(child: &mut Child, log: &Log) {
    let pid = child.id() as i32;
    for (signal, grace) in [
        (libc::SIGINT, Duration::from_secs(60)),
        (libc::SIGQUIT, Duration::from_secs(10)),
        (libc::SIGKILL, Duration::from_secs(10)),
    ] {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        if signal != libc::SIGINT {
            log.info(format_args!("the server did not stop; sending signal {signal}"));
        }
        // SAFETY: kill has no memory effects; the child is not reaped yet, so the pid is still ours.
        unsafe { libc::kill(pid, signal) };
        let started = Instant::now();
        while started.elapsed() < grace && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = child.wait();
}

/// Waits (bounded) until no prefetch worker holds a spool's lock: the worker exits once the
/// postmaster is gone.
fn wait_for_prefetch_worker(spools: &Path) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let Ok(entries) = fs::read_dir(spools) else { return };
        let held = entries.flatten().any(|entry| {
            fs::File::open(entry.path().join("worker.lock")).is_ok_and(|lock| match lock.try_lock() {
                Ok(()) => {
                    let _ = lock.unlock();
                    false
                }
                Err(_) => true,
            })
        });
        if !held {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_says_why_in_its_last_matching_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("postgres.log");
        fs::write(
            &log,
            "LOG:  starting point-in-time recovery\nwal-fetch: 00000002.history is not in the archive\n\
             wal-fetch: 000000010000000000000003 is not in the archive\nFATAL:  could not locate required checkpoint record\n",
        )
        .unwrap();
        let said = last_lines(&log, &["FATAL:", "is not in the archive"], 2);
        assert_eq!(
            said,
            ": wal-fetch: 000000010000000000000003 is not in the archive; FATAL:  could not locate required checkpoint record"
        );
        assert_eq!(last_lines(&dir.path().join("none"), &["FATAL:"], 1), "");
    }
}
