//! `base-verify`: from cron, whether a base backup is whole (every part and its manifest checked
//! against the catalog), and with `--restore-test` whether it really restores: restored into a
//! scratch directory, PostgreSQL started on it and queried, every step timed (the measured RTO).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use walship::base::catalog::chain_problem;
use walship::base::{self, BackupRecord, BackupType};
use walship::config::{Config, parse_duration};
use walship::log::Log;
use walship::repo::Repository;
use walship::verify::backup::{IntegrityOptions, verify_backup, verify_manifest};
use walship::verify::metrics::{self, Metrics};
use walship::verify::restore_test::{RestoreTestOptions, RestoreTestReport, restore_test};
use walship::verify::{Finding, FindingKind};
use walship::{Error, retry};
use walship_cli::{COMMON_HELP, CommonArgs, human_bytes};

const COMMAND: &str = "base-verify";

#[derive(Parser, Debug)]
#[command(
    name = "base-verify",
    version,
    about = "Check that a base backup is whole, and with --restore-test that it really restores",
    long_about = "Check that a base backup is whole, and with --restore-test that it really restores.\n\n\
        NAME is a backup name from base-list, or LATEST (the default): the newest complete backup; --all \
        checks every backup in the catalog. An incremental backup is checked with every backup of its chain \
        (each once with --all); a chain with a missing or wrong link is a broken_chain problem naming it.\n\n\
        Without --restore-test: every part of every archive is read from the repository and decoded \
        (streamed, transfer_concurrency parts at a time), and checked against its own trailer and the \
        catalog record (SHA-256, original and stored size); the stored backup_manifest is checked the same \
        way, and its WAL ranges (timeline, start and end LSN) and system identifier compared with the \
        record.\n\n\
        With --restore-test: the backup is restored (as base-fetch does, pg_verifybackup included) into a \
        new directory under --scratch, PostgreSQL of the backup's major version is started on it as a child \
        of base-verify (no TCP listener, a private Unix socket, archiving off, this test's own hba file), \
        recovery runs to the first consistent point (--to-end: through all archived WAL of the backup's \
        timeline and those after it) and promotes, the check statements run (select 1, or each \
        --check-sql), the server is stopped and the directory removed. Each step's time is reported: \
        download_and_extract, verify, replay, check, stop_and_cleanup, and the RTO (the first three). \
        SIGINT, SIGTERM or SIGHUP stop the server and remove the directory (exit 11); a base-verify killed \
        outright takes its server down with it (parent-death signal), and the next run removes what it \
        left. Run it as the database's OS user (not root), with the PostgreSQL binaries of the backup's \
        version (pg_bin_dir, PATH or the packages' directories). The repository is only read.\n\n\
        Output: one line per step, per problem and a summary on stderr; --json prints the report on stdout; \
        --metrics FILE writes the figures for node_exporter's textfile collector (also when it could not \
        check). Exit 0: healthy; 13: problems found (damaged parts, a manifest that disagrees, a broken \
        chain, a failed restore test); 1: no such backup, or no backup at all; other codes: could not check.\n\n\
        Examples (cron, as postgres):\n    \
        30 5 * * *  base-verify --restore-test LATEST --metrics /var/lib/prometheus/node-exporter/walship-base.prom\n    \
        0 3 * * 0   base-verify --all --metrics /var/lib/prometheus/node-exporter/walship-base.prom\n    \
        base-verify --restore-test --to-end --check-sql 'select count(*) from pgbench_accounts' 20261122T031500Z",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// The backup to check: a name from base-list, or LATEST [default: LATEST]
    #[arg(conflicts_with = "all")]
    name: Option<String>,

    /// Check every backup in the catalog
    #[arg(long)]
    all: bool,

    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,

    /// Restore the backup into a scratch directory, start PostgreSQL on it and run the check
    /// statements, instead of only reading its parts
    #[arg(long)]
    restore_test: bool,

    /// With --restore-test: replay all archived WAL (the backup's timeline and its descendants)
    /// rather than stopping at the first consistent point
    #[arg(long, requires = "restore_test")]
    to_end: bool,

    /// With --restore-test: where to make the scratch directory [default: $TMPDIR, else /tmp]
    #[arg(long, value_name = "DIR", requires = "restore_test")]
    scratch: Option<PathBuf>,

    /// With --restore-test: a statement to run on the restored server (repeatable; each must
    /// succeed) [default: select 1]
    #[arg(long, value_name = "SQL", requires = "restore_test")]
    check_sql: Vec<String>,

    /// With --restore-test: the database the check statements connect to
    #[arg(long, value_name = "NAME", default_value = "postgres", requires = "restore_test")]
    check_database: String,

    /// With --restore-test: fail when the server does not accept connections within DURATION
    /// (30m, 2h) [default: no limit]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "restore_test")]
    timeout: Option<Duration>,

    /// Write the figures in Prometheus' text format to FILE (atomically), for node_exporter
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,
}

/// The port the restored server's socket is named after; it listens on no TCP port.
const SCRATCH_PORT: u16 = 5432;

fn main() {
    walship_cli::exit_on_panic(COMMAND, |code| code as u8);
    let cli: Cli = walship_cli::parse_or_exit(COMMAND, |code| code as u8);
    let log = Log::new(COMMAND, cli.common.verbose);
    let started = Instant::now();
    let config = cli.common.load_config();
    let workers = config.as_ref().map_or(1, |c| c.base.transfer_concurrency);
    let repo_url = config.as_ref().map_or_else(|_| cli.common.repo.clone().unwrap_or_default(), |c| c.repo.to_string());
    let work = async {
        let config = config?;
        walship_cli::on_repository(&config, &log, async |repo, deadline| run(&cli, &config, repo, deadline, &log).await)
            .await
    };
    // The restore test's server must be spawned by a thread that lives as long as base-verify (its
    // parent-death signal follows the thread): the current-thread runtime's. Reading parts only
    // decodes on every core.
    let result =
        if cli.restore_test { walship_cli::block_on(work) } else { walship_cli::block_on_parallel(workers, work) };
    let took = started.elapsed();
    match result {
        Ok(outcome) => {
            let checked = outcome.checked.iter().flat_map(Checked::findings);
            let findings: Vec<Finding> = outcome.findings.iter().cloned().chain(checked).collect();
            if cli.json {
                walship_cli::print_result_line(&json_report(&outcome, &findings, took).to_string());
            }
            let figures = metrics_of(&repo_url, &outcome, &findings, took);
            let metrics = cli.metrics.as_deref().map(|path| (path, &figures));
            walship_cli::finish_verify(&log, &findings, &summary(&outcome.checked, took), metrics);
        }
        Err(e) => walship_cli::could_not_check(&log, COMMAND, cli.metrics.as_deref(), &repo_url, took, &e),
    }
}

/// What base-verify learnt: the catalog, and each backup it checked.
struct Outcome {
    /// Every complete backup in the catalog (for the metrics), oldest first.
    catalog: Vec<Summary>,
    /// What concerns the catalog as a whole (no backup at all).
    findings: Vec<Finding>,
    checked: Vec<Checked>,
}

/// What base-verify learnt about one backup it checked.
struct Checked {
    backup: Summary,
    /// Its chain's backups, oldest first, when the chain is whole (a full backup: itself alone).
    chain: Vec<String>,
    /// Why its chain is broken.
    broken_chain: Option<Finding>,
    /// The integrity check's findings, when it ran.
    integrity: Option<Vec<Finding>>,
    restore_test: Option<RestoreTestReport>,
}

impl Checked {
    fn findings(&self) -> Vec<Finding> {
        let restore = self.restore_test.iter().flat_map(|r| r.findings.iter());
        self.broken_chain.iter().chain(self.integrity.iter().flatten()).chain(restore).cloned().collect()
    }

    /// Every part and the manifest were read and passed: by the integrity check, or with a restore
    /// test by its restore (which checks each part and runs pg_verifybackup) and the manifest's
    /// comparison with the catalog.
    fn verified(&self) -> bool {
        let integrity = self.integrity.as_ref().is_some_and(Vec::is_empty) && self.broken_chain.is_none();
        match &self.restore_test {
            None => integrity,
            Some(report) => integrity && report.steps.iter().any(|(step, _)| *step == "verify"),
        }
    }
}

/// A backup as the metrics and the report show it.
#[derive(Debug, Clone)]
struct Summary {
    name: String,
    finished_at: String,
    finished_unix: Option<i128>,
    original_bytes: u64,
    stored_bytes: u64,
    backup_type: BackupType,
    parent: Option<String>,
}

impl Summary {
    fn of(record: &BackupRecord) -> Self {
        Summary {
            name: record.name.clone(),
            finished_at: record.finished_at.clone(),
            finished_unix: record.finished_at_unix(),
            original_bytes: record.original_bytes,
            stored_bytes: record.stored_bytes,
            backup_type: record.backup_type,
            parent: record.parent.clone(),
        }
    }
}

/// Reads the catalog, picks the backups to check and checks each.
async fn run(
    cli: &Cli,
    config: &Config,
    repo: &Repository,
    deadline: retry::Deadline,
    log: &Log,
) -> Result<Outcome, Error> {
    let (catalog, records) = select(cli, repo, deadline, log).await?;
    let restore = if cli.restore_test { Some(restore_options(cli, config)?) } else { None };
    let mut findings = Vec::new();
    if records.is_empty() {
        let message = format!("{}: the catalog holds no complete base backup: nothing can be restored", repo.url());
        findings.push(Finding::new(FindingKind::NoBackups, repo.url(), message));
    }
    let mut checked = Vec::new();
    for target in targets(cli, repo, deadline, log, records).await? {
        checked.push(check(repo, config, restore.as_ref(), target, log).await?);
    }
    Ok(Outcome { catalog, findings, checked })
}

/// One backup to check, with what its chain is.
struct Target {
    record: BackupRecord,
    /// Its chain's backups, oldest first, when the chain is whole.
    chain: Vec<String>,
    broken_chain: Option<Finding>,
    /// With --restore-test: the other backups of its chain, whose manifests are compared with the
    /// catalog beside the restore (which fetches and checks every part of each).
    links: Vec<BackupRecord>,
}

/// The backups to check. NAME or LATEST: the backup and, when it is incremental, every link of its
/// chain (read with [`base::chain_of`]), each checked by the same rules; with --restore-test the
/// backup alone, its chain restored with it. --all: every backup once, its chain judged within the
/// catalog read.
async fn targets(
    cli: &Cli,
    repo: &Repository,
    deadline: retry::Deadline,
    log: &Log,
    records: Vec<BackupRecord>,
) -> Result<Vec<Target>, Error> {
    if cli.all {
        let index: HashMap<String, usize> = records.iter().enumerate().map(|(i, r)| (r.name.clone(), i)).collect();
        let find = |name: &str| index.get(name).map(|&i| &records[i]);
        let judged: Vec<(Vec<String>, Option<String>)> =
            records.iter().map(|r| (chain_names(r, find), chain_problem(r, find))).collect();
        return Ok(records
            .into_iter()
            .zip(judged)
            .map(|(record, (chain, problem))| {
                let broken_chain = problem.map(|reason| broken_chain(repo, &record, &reason));
                let chain = if broken_chain.is_some() { Vec::new() } else { chain };
                Target { record, chain, broken_chain, links: Vec::new() }
            })
            .collect());
    }
    let Some(record) = records.into_iter().next() else { return Ok(Vec::new()) };
    let chain = match retry::until(deadline, log, repo.url(), || base::chain_of(repo, record.clone())).await {
        Ok(chain) => chain,
        Err(Error::Corrupt { location, reason }) => {
            // A link's own record unreadable, rather than a link missing: name where.
            let own = repo.storage().location(&BackupRecord::catalog_key(&record.name));
            let reason = if location == own { reason } else { format!("{location}: {reason}") };
            let finding = broken_chain(repo, &record, &reason);
            return Ok(vec![Target { record, chain: Vec::new(), broken_chain: Some(finding), links: Vec::new() }]);
        }
        Err(e) => return Err(e),
    };
    if let Some(reason) = chain_problem(&record, |name| chain.iter().find(|r| r.name == name)) {
        let finding = broken_chain(repo, &record, &reason);
        return Ok(vec![Target { record, chain: Vec::new(), broken_chain: Some(finding), links: Vec::new() }]);
    }
    let names: Vec<String> = chain.iter().map(|r| r.name.clone()).collect();
    if cli.restore_test {
        let links = chain[..chain.len() - 1].to_vec();
        return Ok(vec![Target { record, chain: names, broken_chain: None, links }]);
    }
    Ok(chain
        .into_iter()
        .enumerate()
        .map(|(i, link)| Target { record: link, chain: names[..=i].to_vec(), broken_chain: None, links: Vec::new() })
        .collect())
}

/// The names of `record`'s chain as far as `find` finds it, oldest first.
fn chain_names<'a>(record: &'a BackupRecord, find: impl Fn(&str) -> Option<&'a BackupRecord>) -> Vec<String> {
    let mut names = vec![record.name.clone()];
    let mut link = record;
    while let Some(parent) = link.parent.as_deref().and_then(&find) {
        if names.len() >= base::MAX_CHAIN_LEN {
            break;
        }
        names.push(parent.name.clone());
        link = parent;
    }
    names.reverse();
    names
}

/// The finding for `record`, whose chain is broken for `reason`.
fn broken_chain(repo: &Repository, record: &BackupRecord, reason: &str) -> Finding {
    let location = repo.storage().location(&BackupRecord::catalog_key(&record.name));
    let message =
        format!("backup {} ({}): {location}: its chain is broken: {reason}", record.name, record.backup_type.as_str());
    Finding::new(FindingKind::BrokenChain, record.name.clone(), message)
}

/// Checks one backup: its parts and manifest, or with a restore test its chain's manifests and the
/// restore (skipped when its chain is broken: it cannot restore, and the finding says why).
async fn check(
    repo: &Repository,
    config: &Config,
    restore: Option<&RestoreTestOptions>,
    target: Target,
    log: &Log,
) -> Result<Checked, Error> {
    let record = &target.record;
    let (integrity, restore_test) = match restore {
        None => {
            log.info(format_args!(
                "verifying backup {} ({}, {} in {} parts)",
                record.name,
                record.backup_type.as_str(),
                human_bytes(record.stored_bytes),
                record.archives.iter().map(|a| a.parts.len()).sum::<usize>()
            ));
            let started = Instant::now();
            let findings = verify_backup(repo, record, integrity_options(config), log).await?;
            let took = started.elapsed().as_secs_f64();
            log.info(format_args!(
                "verify: backup {}: every part and the manifest read in {took:.1} s ({:.1} MB/s), {} problem(s)",
                record.name,
                record.stored_bytes as f64 / 1e6 / took.max(0.001),
                findings.len()
            ));
            (Some(findings), None)
        }
        Some(options) => {
            // The restore checks every part and runs pg_verifybackup, but only against the
            // manifest itself: whether each manifest agrees with the catalog is checked here.
            let mut manifests = Vec::new();
            for link in target.links.iter().chain([record]) {
                manifests.extend(verify_manifest(repo, link, integrity_options(config), log).await?);
            }
            let tested = match target.broken_chain {
                None => Some(restore_test(repo, record, options, log).await?),
                Some(_) => None,
            };
            (Some(manifests), tested)
        }
    };
    Ok(Checked {
        backup: Summary::of(record),
        chain: target.chain,
        broken_chain: target.broken_chain,
        integrity,
        restore_test,
    })
}

/// Every backup's summary, and the records of those to check: NAME, the newest (LATEST) or all.
async fn select(
    cli: &Cli,
    repo: &Repository,
    deadline: retry::Deadline,
    log: &Log,
) -> Result<(Vec<Summary>, Vec<BackupRecord>), Error> {
    let name = cli.name.as_deref().unwrap_or("LATEST");
    let (catalog, mut records) = retry::until(deadline, log, repo.url(), || async {
        let (mut catalog, mut records) = (Vec::new(), Vec::new());
        base::for_each_backup(repo, |record| {
            catalog.push(Summary::of(&record));
            if cli.all || name == "LATEST" {
                if !cli.all {
                    records.clear();
                }
                records.push(record);
            }
            Ok(())
        })
        .await?;
        Ok((catalog, records))
    })
    .await?;
    if !cli.all && name != "LATEST" {
        base::validate_name(name).map_err(Error::Usage)?;
        let record = retry::until(deadline, log, repo.url(), || base::read_record(repo, name)).await;
        if matches!(record, Err(Error::NoSuchBackup(_))) {
            repo.require_identity().await?;
        }
        records = vec![record?];
    }
    if records.is_empty() {
        // An empty catalog is a finding, not "no such backup": nothing can be restored from here. An
        // empty or wrong location must not pass for an empty repository.
        repo.require_identity().await?;
    }
    Ok((catalog, records))
}

fn integrity_options(config: &Config) -> IntegrityOptions {
    IntegrityOptions { transfer_concurrency: config.base.transfer_concurrency, deadline: config.deadline }
}

fn restore_options(cli: &Cli, config: &Config) -> Result<RestoreTestOptions, Error> {
    let scratch_parent = match &cli.scratch {
        Some(dir) => walship_cli::absolute(dir)?,
        None => std::env::temp_dir(),
    };
    Ok(RestoreTestOptions {
        scratch_parent,
        to_end: cli.to_end,
        check_sql: cli.check_sql.clone(),
        check_database: cli.check_database.clone(),
        timeout: cli.timeout,
        restore_command: cli.common.restore_command(config, COMMAND)?,
        pg_bin_dir: config.pg_bin_dir.clone(),
        transfer_concurrency: config.base.transfer_concurrency,
        deadline: config.deadline,
        port: SCRATCH_PORT,
    })
}

fn summary(checked: &[Checked], took: Duration) -> String {
    let tests: Vec<String> = checked
        .iter()
        .filter_map(|c| {
            let rto = c.restore_test.as_ref()?.rto?;
            Some(format!(
                "backup {} restored and accepting connections in {:.1} s (RTO)",
                c.backup.name,
                rto.as_secs_f64()
            ))
        })
        .collect();
    let names: Vec<&str> = checked.iter().map(|c| c.backup.name.as_str()).collect();
    let what = if checked.iter().any(|c| c.restore_test.is_some()) { "restore-tested" } else { "verified" };
    let mut text = format!("{} backup(s) {what} ({}) in {:.1} s", checked.len(), names.join(", "), took.as_secs_f64());
    for test in tests {
        text.push_str("; ");
        text.push_str(&test);
    }
    text
}

fn json_report(outcome: &Outcome, findings: &[Finding], took: Duration) -> serde_json::Value {
    let backups: Vec<serde_json::Value> = outcome
        .checked
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.backup.name,
                "type": c.backup.backup_type.as_str(),
                "parent": c.backup.parent,
                "chain": if c.broken_chain.is_some() { serde_json::Value::Null } else { c.chain.clone().into() },
                "finished_at": c.backup.finished_at,
                "original_bytes": c.backup.original_bytes,
                "stored_bytes": c.backup.stored_bytes,
                "verified": c.verified(),
                "findings": c.findings(),
                "restore_test": c.restore_test.as_ref().map(json_restore_test),
            })
        })
        .collect();
    let catalog: Vec<serde_json::Value> = outcome
        .catalog
        .iter()
        .map(|b| {
            serde_json::json!({
                "name": b.name, "type": b.backup_type.as_str(), "parent": b.parent, "finished_at": b.finished_at,
                "original_bytes": b.original_bytes, "stored_bytes": b.stored_bytes,
            })
        })
        .collect();
    serde_json::json!({
        "healthy": findings.is_empty(),
        "catalog": { "backups": catalog, "newest_backup_age_seconds": newest_age_seconds(&outcome.catalog) },
        "backups": backups,
        "findings": findings,
        "duration_seconds": took.as_secs_f64(),
    })
}

fn json_restore_test(report: &RestoreTestReport) -> serde_json::Value {
    let steps: serde_json::Map<String, serde_json::Value> =
        report.steps.iter().map(|(step, took)| ((*step).to_owned(), took.as_secs_f64().into())).collect();
    serde_json::json!({
        "healthy": report.healthy(),
        "steps": steps,
        "rto_seconds": report.rto.map(|d| d.as_secs_f64()),
        "check_output": report.check_output,
    })
}

/// The figures of a run that could check, for `--metrics FILE`.
fn metrics_of(repo_url: &str, outcome: &Outcome, findings: &[Finding], took: Duration) -> Metrics {
    let mut out = Metrics::new(repo_url);
    catalog_metrics(&mut out, &outcome.catalog);
    for checked in &outcome.checked {
        backup_metrics(&mut out, checked);
    }
    metrics::set_outcome(&mut out, COMMAND, Some(findings), took);
    out
}

/// How long ago the newest complete backup finished, in seconds (millisecond precision).
fn newest_age_seconds(catalog: &[Summary]) -> Option<f64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
    let newest = catalog.iter().filter_map(|s| s.finished_unix).max()?;
    Some(((now - newest).max(0) / 1_000_000) as f64 / 1000.0)
}

fn catalog_metrics(out: &mut Metrics, catalog: &[Summary]) {
    out.set(metrics::BACKUPS, &[], catalog.len() as f64);
    if let Some(age) = newest_age_seconds(catalog) {
        out.set(metrics::BACKUP_NEWEST_AGE, &[], age);
    }
    for backup in catalog {
        out.set(metrics::BACKUP_ORIGINAL_BYTES, &[("backup", &backup.name)], backup.original_bytes as f64);
        out.set(metrics::BACKUP_STORED_BYTES, &[("backup", &backup.name)], backup.stored_bytes as f64);
    }
}

fn backup_metrics(out: &mut Metrics, checked: &Checked) {
    let backup = [("backup", checked.backup.name.as_str())];
    out.set(metrics::BACKUP_VERIFIED, &backup, f64::from(u8::from(checked.verified())));
    let Some(report) = &checked.restore_test else { return };
    out.set(metrics::RESTORE_TEST_HEALTHY, &backup, f64::from(u8::from(report.healthy())));
    if let Some(rto) = report.rto {
        out.set(metrics::RESTORE_TEST_RTO, &backup, rto.as_secs_f64());
    }
    for (step, took) in &report.steps {
        out.set(metrics::RESTORE_TEST_STEP, &[backup[0], ("step", step)], took.as_secs_f64());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    out.set(metrics::RESTORE_TEST_TIMESTAMP, &backup, now.as_secs() as f64);
}
