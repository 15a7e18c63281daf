//! Settings from a TOML file, the environment and flags, resolved into one [`Config`].
//!
//! Precedence: `--repo` over `WALSHIP_REPO` over the file's `repo`. The file is `--config`, else
//! `$WALSHIP_CONFIG`, else `/etc/walship/walship.toml` when it exists. An unknown key is an error
//! that names it: a misspelt setting silently ignored is how archives end up somewhere unexpected.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::COMPRESSION_LEVELS;
use crate::encryption::{EncryptionConfig, EncryptionTable};
use crate::error::Error;
use crate::storage::Settings;
// The URL and the backends' settings belong to storage; re-exported so that `config` names all
// that a configuration holds.
pub use crate::storage::RepoUrl;
use crate::storage::s3::{S3Settings, S3Table};
use crate::storage::settings::{ByteSize, seconds};
use crate::storage::ssh::{SshSettings, SshTable};

/// The configuration file read when neither `--config` nor `$WALSHIP_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/walship/walship.toml";
/// The environment variable naming the configuration file.
pub const ENV_CONFIG: &str = "WALSHIP_CONFIG";
/// The environment variable naming the repository (below `--repo`, above the file's `repo`).
pub const ENV_REPO: &str = "WALSHIP_REPO";

/// `compression_level` when unset: zstd's fastest, which keeps up with WAL on one core.
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
/// `deadline_secs` when unset.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// The `[base]` table: base backups (base-push, base-fetch), resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseConfig {
    /// Bytes of pg_basebackup's tar stream per stored part.
    pub part_size: u64,
    /// zstd worker threads compressing one base backup (0: one per core).
    pub compression_workers: u32,
    /// Parts downloaded at once by base-fetch, and parts being completed at once by base-push.
    pub transfer_concurrency: usize,
    /// How often progress is logged when stderr is not a terminal.
    pub progress_interval: Duration,
    /// Where base-push spools a backup with extra tablespaces, which pg_basebackup cannot stream.
    pub spool_dir: PathBuf,
}

/// `[base] part_size` when unset.
pub const DEFAULT_BASE_PART_SIZE: u64 = 256 << 20;
/// A part must hold a useful amount of data; an object per megabyte or less only adds requests.
pub const BASE_PART_SIZES: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 30);

impl Default for BaseConfig {
    fn default() -> Self {
        BaseConfig {
            part_size: DEFAULT_BASE_PART_SIZE,
            compression_workers: 0,
            transfer_concurrency: 4,
            progress_interval: Duration::from_secs(30),
            spool_dir: std::env::temp_dir(),
        }
    }
}

/// The `[push]` table: wal-push's look-ahead over segments waiting in `pg_wal/archive_status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushConfig {
    /// Segments marked `.ready` beyond the requested one that a call may upload ahead (0: off).
    pub look_ahead: usize,
    /// Segments uploaded at once, the requested one included.
    pub parallel: usize,
}

/// `[push] look_ahead` when unset.
pub const DEFAULT_LOOK_AHEAD: usize = 16;
/// `[push] parallel` when unset.
pub const DEFAULT_PUSH_PARALLEL: usize = 4;

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig { look_ahead: DEFAULT_LOOK_AHEAD, parallel: DEFAULT_PUSH_PARALLEL }
    }
}

/// The `[fetch]` table: wal-fetch's background prefetch into a spool under `pg_wal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchConfig {
    /// Segments kept fetched ahead of the one recovery asked for last (0: off). Also the spool's
    /// bound: at most this many segments (plus those in flight) sit in it.
    pub prefetch: usize,
    /// Segments downloaded at once by the prefetch worker.
    pub parallel: usize,
    /// The worker exits when recovery has asked for nothing new for this long.
    pub prefetch_idle: Duration,
}

/// `[fetch] prefetch` when unset.
pub const DEFAULT_PREFETCH: usize = 16;
/// `[fetch] parallel` when unset.
pub const DEFAULT_FETCH_PARALLEL: usize = 4;
/// `[fetch] prefetch_idle_secs` when unset.
pub const DEFAULT_PREFETCH_IDLE: Duration = Duration::from_secs(30);

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            prefetch: DEFAULT_PREFETCH,
            parallel: DEFAULT_FETCH_PARALLEL,
            prefetch_idle: DEFAULT_PREFETCH_IDLE,
        }
    }
}

/// `[retention] abandoned_after` when unset: a day, far longer than any one part of a base backup or
/// any segment takes to upload.
pub const DEFAULT_ABANDONED_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The `[retention]` table: base-expire's policy (flags override it) and housekeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionConfig {
    /// `keep`: the N newest complete backups stay.
    pub keep: Option<u32>,
    /// `keep_within`: what a recovery to any moment of this window needs stays.
    pub keep_within: Option<Duration>,
    /// `abandoned_after`: temporary files and multipart uploads older than this are removed.
    pub abandoned_after: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { keep: None, keep_within: None, abandoned_after: DEFAULT_ABANDONED_AFTER }
    }
}

impl RetentionConfig {
    /// Resolves the `[retention]` table (an absent one is empty); the error names the key at fault.
    fn from_table(file: RetentionFile) -> Result<Self, String> {
        if file.keep == Some(0) {
            return Err("keep = 0 would keep no backup: expected 1 or more".into());
        }
        let duration = |value: Option<String>, key: &str| {
            value.map(|text| parse_duration(&text).map_err(|e| format!("{key} = {text:?}: {e}"))).transpose()
        };
        Ok(RetentionConfig {
            keep: file.keep,
            keep_within: duration(file.keep_within, "keep_within")?,
            abandoned_after: duration(file.abandoned_after, "abandoned_after")?.unwrap_or(DEFAULT_ABANDONED_AFTER),
        })
    }
}

/// Parses a duration such as `14d`, `36h`, `1d12h`, `90m` (or `90min`), `2w` or `3600s`: whole
/// numbers, each with a unit (s, m or min, h, d, w), added up; at least one second.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let mut total: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err("empty; expected a duration such as 14d, 36h or 90m".into());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        let number: u64 = rest[..digits].parse().map_err(|_| "expected a number before each unit (14d, 36h, 90m)")?;
        let unit = rest[digits..].chars().next().ok_or("a number without a unit: add s, m, h, d or w")?;
        // `min` as cron users and the README's `--max-age 15min` write minutes.
        let unit_len = if rest[digits..].starts_with("min") { 3 } else { unit.len_utf8() };
        let seconds = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            other => return Err(format!("unknown unit {other:?}: use s, m, h, d or w")),
        };
        total = number.checked_mul(seconds).and_then(|n| total.checked_add(n)).ok_or("too long")?;
        rest = &rest[digits + unit_len..];
    }
    if total == 0 {
        return Err("must be at least 1s".into());
    }
    Ok(Duration::from_secs(total))
}

/// Everything a command needs to know about where and how to archive, resolved and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the repository lives (`--repo`, `WALSHIP_REPO` or `repo`).
    pub repo: RepoUrl,
    /// The configuration file this came from, if any: base-fetch hands it on to the restore_command
    /// it writes, so that wal-fetch reads the same repository.
    pub source_file: Option<PathBuf>,
    /// Where pg_basebackup and pg_verifybackup are; `None`: found on PATH.
    pub pg_bin_dir: Option<PathBuf>,
    /// The `[base]` table.
    pub base: BaseConfig,
    /// The `[push]` table.
    pub push: PushConfig,
    /// The `[fetch]` table.
    pub fetch: FetchConfig,
    /// The `[retention]` table.
    pub retention: RetentionConfig,
    /// zstd level for new objects.
    pub compression_level: i32,
    /// How long one command may keep retrying transient failures before giving up.
    pub deadline: Duration,
    /// The `[s3]` and `[ssh]` tables: what the backend that `repo` names is opened with.
    pub storage: Settings,
    /// The `[encryption]` table, keys read and checked.
    pub encryption: std::sync::Arc<EncryptionConfig>,
}

impl Config {
    /// The store this configuration points at, as a key for local state: the URL plus what the URL
    /// leaves out (the S3 endpoint and region, the SSH port). Local state that vouches for the
    /// repository (look-ahead records, prefetch spools, the data directory's memory) is keyed by it,
    /// so that pointing the configuration at another store never inherits such state. It names a
    /// place; which repository is there now is the identity record's `repository_id`.
    pub fn store_location(&self) -> String {
        match &self.repo {
            RepoUrl::Local(_) => self.repo.to_string(),
            RepoUrl::S3 { .. } => {
                let env_endpoint = std::env::var("AWS_ENDPOINT_URL_S3").or_else(|_| std::env::var("AWS_ENDPOINT_URL"));
                let endpoint = self.storage.s3.endpoint.clone().or(env_endpoint.ok()).unwrap_or_else(|| "aws".into());
                let region = self.storage.s3.region.clone().or(std::env::var("AWS_REGION").ok()).unwrap_or_default();
                format!("{} endpoint={endpoint} region={region}", self.repo)
            }
            RepoUrl::Ssh { .. } => match self.storage.ssh.port {
                Some(port) => format!("{} port={port}", self.repo),
                None => self.repo.to_string(),
            },
        }
    }
}

/// What the command line says about configuration.
#[derive(Debug, Clone, Default)]
pub struct ConfigFlags {
    /// `--config`: the configuration file, which must exist.
    pub config_file: Option<PathBuf>,
    /// `--repo`: the repository URL, above every other source.
    pub repo: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    repo: Option<String>,
    compression_level: Option<i32>,
    deadline_secs: Option<u64>,
    pg_bin_dir: Option<PathBuf>,
    base: Option<BaseFile>,
    push: Option<PushFile>,
    fetch: Option<FetchFile>,
    retention: Option<RetentionFile>,
    s3: Option<S3Table>,
    ssh: Option<SshTable>,
    encryption: Option<EncryptionTable>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseFile {
    part_size: Option<ByteSize>,
    compression_workers: Option<u32>,
    transfer_concurrency: Option<usize>,
    progress_interval_secs: Option<u64>,
    spool_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushFile {
    look_ahead: Option<usize>,
    parallel: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchFile {
    prefetch: Option<usize>,
    parallel: Option<usize>,
    prefetch_idle_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionFile {
    keep: Option<u32>,
    keep_within: Option<String>,
    abandoned_after: Option<String>,
}

impl BaseConfig {
    /// Resolves the `[base]` table (an absent one is empty); the error names the key at fault.
    fn from_table(file: BaseFile) -> Result<Self, String> {
        let defaults = BaseConfig::default();
        let part_size = file.part_size.map_or(defaults.part_size, |size| size.0);
        if !BASE_PART_SIZES.contains(&part_size) {
            return Err(format!("part_size = {part_size} bytes: expected 1 MiB to 64 GiB"));
        }
        let compression_workers = file.compression_workers.unwrap_or(defaults.compression_workers);
        if compression_workers > 256 {
            return Err(format!("compression_workers = {compression_workers}: expected 0 (one per core) to 256"));
        }
        let transfer_concurrency = file.transfer_concurrency.unwrap_or(defaults.transfer_concurrency);
        if !(1..=64).contains(&transfer_concurrency) {
            return Err(format!("transfer_concurrency = {transfer_concurrency}: expected 1 to 64"));
        }
        let progress_interval =
            seconds(file.progress_interval_secs, "progress_interval_secs", defaults.progress_interval)?;
        let spool_dir = match file.spool_dir {
            Some(dir) if !dir.is_absolute() => {
                return Err(format!("spool_dir = {:?} must be an absolute path", dir.display().to_string()));
            }
            Some(dir) => dir,
            None => defaults.spool_dir,
        };
        Ok(BaseConfig { part_size, compression_workers, transfer_concurrency, progress_interval, spool_dir })
    }
}

impl PushConfig {
    /// Resolves the `[push]` table (an absent one is empty); the error names the key at fault.
    fn from_table(file: PushFile) -> Result<Self, String> {
        let look_ahead = file.look_ahead.unwrap_or(DEFAULT_LOOK_AHEAD);
        if look_ahead > 256 {
            return Err(format!("look_ahead = {look_ahead}: expected 0 (off) to 256"));
        }
        Ok(PushConfig { look_ahead, parallel: parallel(file.parallel, DEFAULT_PUSH_PARALLEL)? })
    }
}

impl FetchConfig {
    /// Resolves the `[fetch]` table (an absent one is empty); the error names the key at fault.
    fn from_table(file: FetchFile) -> Result<Self, String> {
        let prefetch = file.prefetch.unwrap_or(DEFAULT_PREFETCH);
        if prefetch > 256 {
            return Err(format!("prefetch = {prefetch}: expected 0 (off) to 256"));
        }
        let parallel = parallel(file.parallel, DEFAULT_FETCH_PARALLEL)?;
        let prefetch_idle = seconds(file.prefetch_idle_secs, "prefetch_idle_secs", DEFAULT_PREFETCH_IDLE)?;
        Ok(FetchConfig { prefetch, parallel, prefetch_idle })
    }
}

/// The `parallel` key of `[push]` and `[fetch]`: 1 to 64, `default` when unset.
fn parallel(value: Option<usize>, default: usize) -> Result<usize, String> {
    let parallel = value.unwrap_or(default);
    if !(1..=64).contains(&parallel) {
        return Err(format!("parallel = {parallel}: expected 1 to 64"));
    }
    Ok(parallel)
}

/// The top-level `compression_level`.
fn compression_level(value: Option<i32>) -> Result<i32, String> {
    let level = value.unwrap_or(DEFAULT_COMPRESSION_LEVEL);
    if !COMPRESSION_LEVELS.contains(&level) {
        return Err(format!(
            "compression_level = {level} is out of range ({} to {})",
            COMPRESSION_LEVELS.start(),
            COMPRESSION_LEVELS.end()
        ));
    }
    Ok(level)
}

/// The top-level `pg_bin_dir`, which must be absolute.
fn pg_bin_dir(value: Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    match value {
        Some(dir) if !dir.is_absolute() => {
            Err(format!("pg_bin_dir = {:?} must be an absolute path", dir.display().to_string()))
        }
        other => Ok(other),
    }
}

impl Config {
    /// Resolves the configuration from flags, the process environment and the file system.
    pub fn load(flags: &ConfigFlags) -> Result<Config, Error> {
        Self::load_with(flags, |name| std::env::var(name).ok(), Path::new(DEFAULT_CONFIG_PATH))
    }

    /// [`Config::load`] with the environment and default path given, for tests. Keys are checked in
    /// the order of the file's documentation, each table by the module that owns it.
    pub fn load_with(
        flags: &ConfigFlags,
        env: impl Fn(&str) -> Option<String>,
        default_path: &Path,
    ) -> Result<Config, Error> {
        let (file, file_name) = read_file(flags, &env, default_path)?;
        let label = file_name.as_ref().map_or("configuration".to_owned(), |p| p.display().to_string());
        let repo = resolve_repo(flags, &env, file.repo, &label)?;
        let top = || config_error(label.clone());
        let table = |name: &str| config_error(format!("{label} [{name}]"));
        Ok(Config {
            repo,
            source_file: file_name.clone(),
            compression_level: compression_level(file.compression_level).map_err(top())?,
            deadline: seconds(file.deadline_secs, "deadline_secs", DEFAULT_DEADLINE).map_err(top())?,
            pg_bin_dir: pg_bin_dir(file.pg_bin_dir).map_err(top())?,
            base: BaseConfig::from_table(file.base.unwrap_or_default()).map_err(table("base"))?,
            push: PushConfig::from_table(file.push.unwrap_or_default()).map_err(table("push"))?,
            fetch: FetchConfig::from_table(file.fetch.unwrap_or_default()).map_err(table("fetch"))?,
            retention: RetentionConfig::from_table(file.retention.unwrap_or_default()).map_err(table("retention"))?,
            storage: Settings {
                s3: S3Settings::from_table(file.s3.unwrap_or_default()).map_err(table("s3"))?,
                ssh: SshSettings::from_table(file.ssh.unwrap_or_default()).map_err(table("ssh"))?,
            },
            encryption: std::sync::Arc::new(
                EncryptionConfig::from_table(file.encryption.unwrap_or_default()).map_err(table("encryption"))?,
            ),
        })
    }
}

/// Turns a table's message into the error that names where the table came from.
fn config_error(source_name: String) -> impl FnOnce(String) -> Error {
    move |message| Error::Config { source_name, message }
}

/// Reads and parses the configuration file: the one `--config` or `$WALSHIP_CONFIG` names (which must
/// exist), else `default_path` if it exists, else none. Returns the file's path with its content.
fn read_file(
    flags: &ConfigFlags,
    env: &impl Fn(&str) -> Option<String>,
    default_path: &Path,
) -> Result<(FileConfig, Option<PathBuf>), Error> {
    let explicit = flags
        .config_file
        .clone()
        .map(|p| (p, "--config"))
        .or_else(|| env(ENV_CONFIG).filter(|v| !v.is_empty()).map(|v| (PathBuf::from(v), ENV_CONFIG)));
    match explicit {
        Some((path, origin)) => {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::Config {
                source_name: path.display().to_string(),
                message: format!("cannot read the configuration file named by {origin}: {e}"),
            })?;
            Ok((parse_file(&path, &text)?, Some(path)))
        }
        None if default_path.exists() => {
            let text = std::fs::read_to_string(default_path).map_err(|e| Error::Config {
                source_name: default_path.display().to_string(),
                message: format!("cannot read: {e}"),
            })?;
            Ok((parse_file(default_path, &text)?, Some(default_path.to_owned())))
        }
        None => Ok((FileConfig::default(), None)),
    }
}

/// The repository URL: `--repo` over `WALSHIP_REPO` over the file's `repo` (read from `file_label`).
fn resolve_repo(
    flags: &ConfigFlags,
    env: &impl Fn(&str) -> Option<String>,
    file_repo: Option<String>,
    file_label: &str,
) -> Result<RepoUrl, Error> {
    let (repo_text, repo_origin) = if let Some(repo) = &flags.repo {
        (repo.clone(), "--repo".to_owned())
    } else if let Some(repo) = env(ENV_REPO).filter(|v| !v.is_empty()) {
        (repo, ENV_REPO.to_owned())
    } else if let Some(repo) = file_repo {
        (repo, file_label.to_owned())
    } else {
        return Err(Error::Config {
            source_name: "configuration".into(),
            message: format!(
                "no repository configured: pass --repo, set {ENV_REPO}, or set repo in a configuration \
                 file (--config, {ENV_CONFIG}, or {DEFAULT_CONFIG_PATH})"
            ),
        });
    };
    RepoUrl::parse(&repo_text).map_err(|message| Error::Config { source_name: repo_origin, message })
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, Error> {
    toml::from_str(text).map_err(|e| {
        let message = without_values(&e.message().replace('\n', " "));
        let source_name = match e.span() {
            Some(span) => {
                let line_number = text[..span.start].matches('\n').count() + 1;
                let line = text.lines().nth(line_number - 1).unwrap_or("");
                // serde's type errors do not name the key; the offending line's key does.
                return Error::Config {
                    source_name: format!("{}:{line_number}", path.display()),
                    message: format!("{message}{}", key_of_line(line)),
                };
            }
            None => path.display().to_string(),
        };
        Error::Config { source_name, message }
    })
}

/// The key of a configuration line, never its value: errors land in the PostgreSQL server log on
/// every call, and the line may be a misspelt `secret_access_key` or a secret pasted without quotes.
fn key_of_line(line: &str) -> String {
    let line = line.trim();
    match line.split_once('=') {
        Some((key, _)) => format!(" (in `{} = …`)", key.trim()),
        None if line.starts_with('[') && !line.contains(['"', '\'']) => format!(" (in `{line}`)"),
        None => String::new(),
    }
}

/// serde's "invalid type: string \"VALUE\", expected …" quotes the value it rejected; keep the kind
/// of value (string, integer, …) and what was expected, drop the value itself.
fn without_values(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: ", "invalid length "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let kind = rest.split_whitespace().next().unwrap_or("value").trim_end_matches(',');
            let expected = rest.split_once(", expected ").map(|(_, e)| format!(", expected {e}")).unwrap_or_default();
            return format!("{prefix}{kind}{expected}");
        }
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(flags: ConfigFlags, env: &[(&str, &str)], file: Option<&str>) -> Result<Config, Error> {
        let dir = tempfile::tempdir().unwrap();
        let default_path = dir.path().join("walship.toml");
        if let Some(text) = file {
            std::fs::write(&default_path, text).unwrap();
        }
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::load_with(&flags, |name| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()), &default_path)
    }

    /// Each `(text, needle)`: the file `head` + `text` is refused as a configuration error (exit 3)
    /// whose message contains `needle`.
    fn assert_refused(head: &str, cases: &[(&str, &str)]) {
        for (text, needle) in cases {
            let err = load(ConfigFlags::default(), &[], Some(&format!("{head}\n{text}\n"))).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
            assert_eq!(err.exit_code(), crate::error::ExitCode::Config, "{text}");
        }
    }

    #[test]
    fn flag_beats_environment_beats_file() {
        let file = Some("repo = \"/from/file\"\n");
        let flags = ConfigFlags { repo: Some("file:///from/flag".into()), ..Default::default() };
        assert_eq!(load(flags, &[(ENV_REPO, "/from/env")], file).unwrap().repo, RepoUrl::Local("/from/flag".into()));
        assert_eq!(
            load(ConfigFlags::default(), &[(ENV_REPO, "/from/env")], file).unwrap().repo,
            RepoUrl::Local("/from/env".into())
        );
        let config = load(ConfigFlags::default(), &[], file).unwrap();
        assert_eq!(config.repo, RepoUrl::Local("/from/file".into()));
        assert_eq!(config.compression_level, DEFAULT_COMPRESSION_LEVEL);
        assert_eq!(config.deadline, DEFAULT_DEADLINE);
    }

    #[test]
    fn retention_keys_are_read_and_checked() {
        let text = "repo = '/r'\n[retention]\nkeep = 3\nkeep_within = '1d12h'\nabandoned_after = '6h'\n";
        let retention = load(ConfigFlags::default(), &[], Some(text)).unwrap().retention;
        assert_eq!(
            retention,
            RetentionConfig {
                keep: Some(3),
                keep_within: Some(Duration::from_secs(36 * 3600)),
                abandoned_after: Duration::from_secs(6 * 3600)
            }
        );
        assert_eq!(
            load(ConfigFlags::default(), &[], Some("repo = '/r'\n")).unwrap().retention,
            RetentionConfig::default()
        );
        assert_refused(
            "repo = '/r'\n[retention]",
            &[
                ("keep = 0", "keep = 0"),
                ("keep_within = '14'", "without a unit"),
                ("keep_within = '2y'", "unknown unit"),
                ("keep_within = '0d'", "at least 1s"),
                ("abandoned_after = 'soon'", "abandoned_after"),
                ("keep_for = 3", "keep_for"),
            ],
        );
        assert_eq!(parse_duration("2w").unwrap(), Duration::from_secs(14 * 86_400));
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("15min").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h30min").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("15mi").is_err());
    }

    #[test]
    fn all_keys_are_read() {
        let config =
            load(ConfigFlags::default(), &[], Some("repo = '/r'\ncompression_level = 5\ndeadline_secs = 9\n")).unwrap();
        assert_eq!((config.compression_level, config.deadline), (5, Duration::from_secs(9)));
    }

    #[test]
    fn no_value_of_a_failing_line_is_echoed() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        for text in [
            format!("repo = 's3://b-1/p'\n[s3]\naccess_key_id = 'AK'\nsecret_acess_key = '{secret}'\n"),
            format!("repo = 's3://b-1/p'\n[s3]\naccess_key_id = 'AK'\nsecret_access_key = {secret}\n"),
            format!("repo = 's3://b-1/p'\n[s3]\nsecret_access_key = 1{}\n", &secret[..4].len()),
            format!("repo = 's3://b-1/p'\n[s3]\naccess_key_id = 'AK'\nsecret_access_key = ['{secret}']\n"),
            format!("repo = 's3://b-1/p'\n{secret}\n"),
            format!("repo = 'ssh://walship:{secret}@backup/srv/r'\n"),
        ] {
            let err = load(ConfigFlags::default(), &[], Some(&text)).unwrap_err().to_string();
            assert!(!err.contains(secret) && !err.contains("wJalr"), "{err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
        let err = load(ConfigFlags::default(), &[], Some("repo = '/r'\n[s3]\nsecret_acess_key = 'x'\n")).unwrap_err();
        assert!(err.to_string().contains("secret_acess_key") && err.to_string().contains(":3"), "{err}");
        let err =
            load(ConfigFlags::default(), &[], Some("repo = '/r'\n[s3]\nsecret_access_key = 12345\n")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("secret_access_key = …") && text.contains("integer") && !text.contains("12345"),
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = load(ConfigFlags::default(), &[], Some("repo = '/r'\ncompresion_level = 5\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("compresion_level") && text.contains("walship.toml:2"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
        let err = load(ConfigFlags::default(), &[], Some("repo = '/r'\n[s3]\nbucket = 'b'\n")).unwrap_err();
        assert!(err.to_string().contains("bucket") && err.to_string().contains(":3"), "{err}");
        let err = load(ConfigFlags::default(), &[], Some("repo = '/r'\n[ssh]\nhost = 'x'\n")).unwrap_err();
        assert!(err.to_string().contains("host") && err.to_string().contains(":3"), "{err}");
    }

    #[test]
    fn base_backup_keys_are_read_and_checked() {
        let file = "repo = '/r'\npg_bin_dir = '/usr/lib/postgresql/15/bin'\n[base]\npart_size = '8MiB'\n\
                    compression_workers = 3\ntransfer_concurrency = 2\nprogress_interval_secs = 5\nspool_dir = '/srv/spool'\n";
        let config = load(ConfigFlags::default(), &[], Some(file)).unwrap();
        assert_eq!(config.pg_bin_dir.as_deref(), Some(Path::new("/usr/lib/postgresql/15/bin")));
        assert_eq!(
            config.base,
            BaseConfig {
                part_size: 8 << 20,
                compression_workers: 3,
                transfer_concurrency: 2,
                progress_interval: Duration::from_secs(5),
                spool_dir: PathBuf::from("/srv/spool"),
            }
        );
        assert_eq!(load(ConfigFlags::default(), &[], Some("repo = '/r'\n")).unwrap().base, BaseConfig::default());
        let refused = [
            ("pg_bin_dir = 'bin'", "pg_bin_dir"),
            ("[base]\npart_size = '512KiB'", "part_size"),
            ("[base]\ncompression_workers = 1000", "compression_workers"),
            ("[base]\ntransfer_concurrency = 0", "transfer_concurrency"),
            ("[base]\nprogress_interval_secs = 0", "progress_interval_secs"),
            ("[base]\nspool_dir = 'tmp'", "spool_dir"),
            ("[base]\nspool = '/tmp'", "spool"),
        ];
        assert_refused("repo = '/r'", &refused);
    }

    #[test]
    fn push_and_fetch_keys_are_read_and_checked() {
        let file = "repo = '/r'\n[push]\nlook_ahead = 0\nparallel = 2\n[fetch]\nprefetch = 32\nparallel = 8\n\
                    prefetch_idle_secs = 5\n";
        let config = load(ConfigFlags::default(), &[], Some(file)).unwrap();
        assert_eq!(config.push, PushConfig { look_ahead: 0, parallel: 2 });
        assert_eq!(config.fetch, FetchConfig { prefetch: 32, parallel: 8, prefetch_idle: Duration::from_secs(5) });
        let defaults = load(ConfigFlags::default(), &[], Some("repo = '/r'\n")).unwrap();
        assert_eq!((defaults.push, defaults.fetch), (PushConfig::default(), FetchConfig::default()));
        let refused = [
            ("[push]\nlook_ahead = 1000", "look_ahead"),
            ("[push]\nparallel = 0", "parallel"),
            ("[push]\nlookahead = 4", "lookahead"),
            ("[fetch]\nprefetch = 1000", "prefetch"),
            ("[fetch]\nparallel = 65", "parallel"),
            ("[fetch]\nprefetch_idle_secs = 0", "prefetch_idle_secs"),
            ("[fetch]\nprefetch = -1", "prefetch"),
        ];
        assert_refused("repo = '/r'", &refused);
    }

    #[test]
    fn bad_values_are_refused() {
        for (file, needle) in [
            ("repo = 'relative/path'", "not absolute"),
            ("repo = 'ftp://x/y'", "ftp"),
            ("repo = '/r/../etc'", ".."),
            ("repo = '/r'\ncompression_level = 40", "compression_level"),
            ("repo = '/r'\ndeadline_secs = 0", "deadline_secs"),
            ("repo = 7", "repo"),
        ] {
            let err = load(ConfigFlags::default(), &[], Some(file)).unwrap_err();
            assert!(err.to_string().contains(needle), "{file}: {err}");
            assert_eq!(err.exit_code(), crate::error::ExitCode::Config);
        }
    }

    #[test]
    fn s3_settings() {
        let config = load(
            ConfigFlags::default(),
            &[],
            Some(
                "repo = 's3://walship/db1'\n[s3]\nendpoint = 'http://127.0.0.1:9000'\nregion = 'eu-west-1'\n\
                 force_path_style = true\naccess_key_id = 'AK'\nsecret_access_key = 'SECRET'\n\
                 storage_class = 'STANDARD_IA'\nsse = 'aws:kms'\nsse_kms_key_id = 'k1'\npart_size = '8MiB'\n\
                 upload_concurrency = 2\nconnect_timeout_secs = 2\nread_timeout_secs = 3\n\
                 conditional_writes = 'require'\n",
            ),
        )
        .unwrap();
        let s3 = &config.storage.s3;
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(s3.force_path_style);
        assert_eq!(s3.part_size, 8 << 20);
        assert_eq!(s3.sse, Some(crate::storage::s3::ServerSideEncryption::Kms { key_id: Some("k1".into()) }));
        assert_eq!((s3.connect_timeout, s3.read_timeout), (Duration::from_secs(2), Duration::from_secs(3)));
        assert_eq!(s3.conditional_writes, crate::storage::s3::ConditionalWritesPolicy::Require);
        let printed = format!("{config:?}");
        assert!(!printed.contains("SECRET") && printed.contains("redacted"), "{printed}");
        let refused = [
            ("part_size = 1024", "part_size"),
            ("part_size = '16 furlongs'", "part_size"),
            ("sse = 'DES'", "sse"),
            ("sse_kms_key_id = 'k'", "sse_kms_key_id"),
            ("access_key_id = 'AK'", "secret_access_key"),
            ("endpoint = '127.0.0.1:9000'", "endpoint"),
            ("upload_concurrency = 0", "upload_concurrency"),
            ("read_timeout_secs = 0", "read_timeout_secs"),
            ("conditional_writes = 'never'", "conditional_writes"),
        ];
        assert_refused("repo = 's3://b-1/p'\n[s3]", &refused);
    }

    #[test]
    fn ssh_settings() {
        let config = load(
            ConfigFlags::default(),
            &[],
            Some(
                "repo = 'ssh://h/p'\n[ssh]\nidentity_file = '/k'\nknown_hosts_file = '/kh'\nport = 2200\n\
                 connect_timeout_secs = 3\nkeepalive_secs = 4\nallow_no_fsync = true\n",
            ),
        )
        .unwrap();
        assert_eq!(config.storage.ssh.port, Some(2200));
        assert_eq!(
            (config.storage.ssh.connect_timeout, config.storage.ssh.keepalive),
            (Duration::from_secs(3), Duration::from_secs(4))
        );
        assert!(config.storage.ssh.allow_no_fsync);
        let err = load(ConfigFlags::default(), &[], Some("repo = '/r'\n[ssh]\nidentity_file = 'k'\n")).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn no_repository_anywhere_says_where_to_put_one() {
        let err = load(ConfigFlags::default(), &[], None).unwrap_err();
        assert!(err.to_string().contains("--repo"), "{err}");
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let flags = ConfigFlags { config_file: Some("/nonexistent/walship.toml".into()), ..Default::default() };
        let err = load(flags, &[], None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/walship.toml"), "{err}");
        let err = load(ConfigFlags::default(), &[(ENV_CONFIG, "/nonexistent/x.toml")], Some("repo='/r'")).unwrap_err();
        assert!(err.to_string().contains(ENV_CONFIG), "{err}");
    }
}
