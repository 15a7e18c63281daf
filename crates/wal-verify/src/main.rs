//! `wal-verify`: the archive's continuity and freshness from cron. Every backup's WAL is there from
//! its start to the newest archived segment, every timeline has its history file, archiving has not
//! stalled, and with `--deep` every object still matches its checksum. Reads only.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use walship::config::parse_duration;
use walship::log::Log;
use walship::verify::metrics::{self, Metrics};
use walship::verify::wal::{self, WalReport, WalVerifyOptions, human_duration, rfc3339};
use walship::{Config, Error};
use walship_cli::{COMMON_HELP, CommonArgs};

#[derive(Parser, Debug)]
#[command(
    name = "wal-verify",
    version,
    about = "Check that the WAL archive is whole and fresh: every backup can be recovered to the newest segment",
    long_about = "Check that the WAL archive is whole and fresh: every backup can be recovered to the newest segment.\n\n\
        For each complete backup in the catalog: the WAL from its start segment to its stop segment is archived \
        (else incomplete_backup_wal: it can never become consistent), and so is every segment from there to the \
        newest one archived along its timeline and every timeline that descends from it, following the history \
        files (else gap, with the missing range as FIRST..LAST segment names and the backups it cuts off). Every \
        timeline after the first that has WAL, a backup or a child needs its history file (missing_history), and \
        each history file must continue its parent's and begin no later than the timeline's first segment \
        (history_mismatch). The newest archived object's age is reported; with --max-age, one older is a \
        problem (stale_archive: archiving has stalled, as pg_stat_archiver's last_archived_time would show). \
        No backup at all is a problem too (no_backups), and so is an S3 store that does not refuse a create of an \
        existing key (conditional_writes_ignored: If-None-Match ignored, or never found out), as the repository's \
        identity record says or, with --probe-writes, as a scratch object written and removed now shows. With --deep every WAL object is read back through the \
        codec and checked against its checksum, --parallel at once with bounded memory; a segment must also be \
        a whole segment whose page header names it (damaged_object, naming the key and the cause).\n\n\
        Nothing is written to the repository, except --probe-writes's scratch object. Output: one line per problem and a summary on stderr; --json \
        prints the report on stdout; --metrics FILE writes Prometheus gauges for node_exporter's textfile \
        collector (atomically), also when the repository could not be checked.\n\n\
        Exit codes: 0 healthy; 13 problems found; any other non-zero code: could not check (3 configuration, \
        6 not a walship repository, 8 storage unreachable...; see below).\n\n\
        DURATION: whole numbers with units s, m (or min), h, d, w, added up: 15min, 90s, 1h30m.\n\n\
        Examples (cron, as postgres):\n    \
        0 * * * *  wal-verify --max-age 15min --metrics /var/lib/prometheus/node-exporter/walship-wal.prom\n    \
        30 5 * * 0  wal-verify --deep --parallel 8 --metrics /var/lib/prometheus/node-exporter/walship-wal.prom\n    \
        wal-verify --config /etc/walship/walship.toml --json | jq .findings",
    after_long_help = COMMON_HELP
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,

    /// Print the report as JSON on stdout
    #[arg(long)]
    json: bool,

    /// A newest archived object older than DURATION is a problem (archiving has stalled): 15min, 1h
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_age: Option<Duration>,

    /// Also read every WAL object and check it against its checksum
    #[arg(long)]
    deep: bool,

    /// Objects --deep reads at once
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    parallel: u16,

    /// Write the figures in Prometheus text format to FILE (replaced atomically)
    #[arg(long, value_name = "FILE")]
    metrics: Option<PathBuf>,

    /// S3: find out now whether the store refuses a create of an existing key, by writing and removing
    /// a scratch object under probe/ (the only write wal-verify ever makes)
    #[arg(long)]
    probe_writes: bool,
}

const COMMAND: &str = "wal-verify";

fn main() {
    walship_cli::exit_on_panic(COMMAND, |code| code as u8);
    let cli: Cli = walship_cli::parse_or_exit(COMMAND, |code| code as u8);
    let log = Log::new(COMMAND, cli.common.verbose);
    let started = Instant::now();
    let config = match cli.common.load_config() {
        Ok(config) => config,
        Err(e) => could_not_check(&cli, &log, cli.common.repo.as_deref().unwrap_or_default(), started, &e),
    };
    let url = config.repo.to_string();
    let options = WalVerifyOptions {
        max_age: cli.max_age,
        deep: cli.deep,
        parallel: usize::from(cli.parallel),
        now: SystemTime::now(),
        deadline: config.deadline,
        probe_writes: cli.probe_writes,
    };
    let result = walship_cli::block_on_parallel(usize::from(cli.parallel), verify(&config, &options, &log));
    let report = match result {
        Ok(report) => report,
        Err(e) => could_not_check(&cli, &log, &url, started, &e),
    };
    let took = started.elapsed();
    if cli.json {
        walship_cli::print_result_line(&json_report(&report, options.now, took).to_string());
    }
    let figures = metrics_of(&url, &report, options.now, took);
    let metrics = cli.metrics.as_deref().map(|path| (path, &figures));
    walship_cli::finish_verify(&log, &report.findings, &summary(&report, options.now), metrics);
}

async fn verify(config: &Config, options: &WalVerifyOptions, log: &Log) -> Result<WalReport, Error> {
    walship_cli::on_repository(config, log, async |repo, _deadline| wal::wal_verify(repo, options, log).await).await
}

/// Nothing is known about the archive: the metrics say so (completed 0), then the error's own code.
fn could_not_check(cli: &Cli, log: &Log, url: &str, started: Instant, error: &Error) -> ! {
    walship_cli::could_not_check(log, COMMAND, cli.metrics.as_deref(), url, started.elapsed(), error)
}

fn age_of(at: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(at).unwrap_or_default()
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn metrics_of(url: &str, report: &WalReport, now: SystemTime, took: Duration) -> Metrics {
    let mut figures = Metrics::new(url);
    metrics::set_outcome(&mut figures, COMMAND, Some(&report.findings), took);
    if let Some((_, at)) = &report.newest_segment {
        figures.set(metrics::WAL_NEWEST_AGE, &[], age_of(*at, now).as_secs_f64());
        figures.set(metrics::WAL_NEWEST_TIMESTAMP, &[], unix_seconds(*at).floor());
    }
    figures.set(metrics::WAL_GAPS, &[], report.gaps as f64);
    figures.set(metrics::WAL_MISSING_SEGMENTS, &[], report.missing_segments as f64);
    figures.set(metrics::WAL_OBJECTS, &[], report.objects as f64);
    if let Some(deep) = &report.deep {
        figures.set(metrics::WAL_OBJECTS_VERIFIED, &[], deep.verified_objects as f64);
        figures.set(metrics::WAL_OBJECTS_DAMAGED, &[], deep.damaged_objects as f64);
    }
    figures
}

fn json_report(report: &WalReport, now: SystemTime, took: Duration) -> serde_json::Value {
    let newest = report.newest_segment.as_ref().map(|(name, at)| {
        serde_json::json!({
            "name": name,
            "archived_at": rfc3339(*at),
            "age_seconds": age_of(*at, now).as_secs_f64(),
        })
    });
    let timelines: Vec<serde_json::Value> = report
        .timelines
        .iter()
        .map(|t| {
            serde_json::json!({
                "timeline": t.timeline, "segments": t.segments, "first": t.first, "last": t.last,
                "history": t.history,
            })
        })
        .collect();
    let deep = report.deep.as_ref().map(|deep| {
        serde_json::json!({
            "verified_objects": deep.verified_objects,
            "damaged_objects": deep.damaged_objects,
            "stored_bytes": deep.stored_bytes,
            "original_bytes": deep.original_bytes,
            "stored_mb_per_second": deep.stored_bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9),
        })
    });
    serde_json::json!({
        "healthy": report.findings.is_empty(),
        "findings": report.findings,
        "newest_segment": newest,
        "segments": report.segments,
        "objects": report.objects,
        "timelines": timelines,
        "gaps": report.gaps,
        "missing_segments": report.missing_segments,
        "backups": report.backups,
        "deep": deep,
        "without_key": report.without_key,
        "conditional_writes": report.conditional_writes,
        "duration_seconds": took.as_secs_f64(),
    })
}

/// The summary line: segments and timelines, the newest segment and its age, backups checked.
fn summary(report: &WalReport, now: SystemTime) -> String {
    let timelines: Vec<String> = report
        .timelines
        .iter()
        .filter_map(|t| Some(format!("{} {}..{}", t.timeline, t.first.as_deref()?, t.last.as_deref()?)))
        .collect();
    let newest = match &report.newest_segment {
        Some((name, at)) => format!("newest {name} archived {} ago", human_duration(age_of(*at, now))),
        None => "nothing archived".to_owned(),
    };
    let deep = report.deep.as_ref().map_or(String::new(), |deep| {
        format!("; deep: {} objects read, {} damaged", deep.verified_objects, deep.damaged_objects)
    });
    let without_key = report.without_key.as_ref().map_or(String::new(), |note| format!("; {note}"));
    format!(
        "{} segments ({} WAL objects) on {} timeline(s) [{}], {newest}; {} backups checked, {} gap(s), {} segment(s) \
         missing{deep}{without_key}",
        report.segments,
        report.objects,
        report.timelines.len(),
        timelines.join(", "),
        report.backups,
        report.gaps,
        report.missing_segments,
    )
}
