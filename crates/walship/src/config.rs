//! Settings from a TOML file, the environment and flags, resolved into one [`Config`].
//!
//! Precedence: `--repo` over `WALSHIP_REPO` over the file's `repo`. The file is `--config`, else
//! `$WALSHIP_CONFIG`, else `/etc/walship/walship.toml` when it exists. An unknown key is an error
//! that names it: a misspelt setting silently ignored is how archives end up somewhere unexpected.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::COMPRESSION_LEVELS;
use crate::error::Error;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/walship/walship.toml";
pub const ENV_CONFIG: &str = "WALSHIP_CONFIG";
pub const ENV_REPO: &str = "WALSHIP_REPO";

pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);

/// Where the repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    Local(PathBuf),
    /// `s3://bucket/prefix`: objects under `prefix/` (no leading or trailing slash; may be empty).
    S3 {
        bucket: String,
        prefix: String,
    },
    /// `ssh://[user@]host[:port]/absolute/path`.
    Ssh {
        user: Option<String>,
        host: String,
        port: Option<u16>,
        path: PathBuf,
    },
}

impl RepoUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let path = if let Some(rest) = text.strip_prefix("file://") {
            rest
        } else if let Some(rest) = text.strip_prefix("s3://") {
            return parse_s3(text, rest);
        } else if let Some(rest) = text.strip_prefix("ssh://") {
            return parse_ssh(text, rest);
        } else if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "unknown repository scheme {scheme:?}; expected file://, s3://, ssh:// or an absolute path"
            ));
        } else {
            text
        };
        if !path.starts_with('/') {
            return Err(format!(
                "repository path {text:?} is not absolute (archive_command runs in the data directory, \
                 so a relative path would land inside it)"
            ));
        }
        if path.split('/').any(|c| c == "..") {
            return Err(format!("repository path {text:?} contains '..'"));
        }
        Ok(RepoUrl::Local(PathBuf::from(path)))
    }
}

fn parse_s3(text: &str, rest: &str) -> Result<RepoUrl, String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !bucket_ok {
        return Err(format!(
            "{text:?}: bucket name {bucket:?} is not valid (3 to 63 lower-case letters, digits, '-' or '.')"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        crate::storage::validate_key(prefix).map_err(|reason| format!("{text:?}: prefix: {reason}"))?;
    }
    Ok(RepoUrl::S3 { bucket: bucket.to_owned(), prefix: prefix.to_owned() })
}

fn parse_ssh(text: &str, rest: &str) -> Result<RepoUrl, String> {
    // `user:password@`, which may hold '/': refused before any message could echo the URL into the
    // server log. `host:22/path@x` is a port, not a password.
    let password = rest.split_once('@').and_then(|(before, _)| before.split_once(':')).is_some_and(|(user, after)| {
        let is_port = after.split('/').next().unwrap_or("").bytes().all(|b| b.is_ascii_digit()) && after.contains('/');
        !user.contains('/') && !is_port
    });
    if password {
        return Err("an ssh:// repository URL cannot carry a password (ssh://user@host/path; walship logs in \
                    with keys or the agent)"
            .into());
    }
    let slash = rest.find('/').ok_or_else(|| format!("{text:?}: expected ssh://[user@]host[:port]/absolute/path"))?;
    let (authority, path) = rest.split_at(slash);
    let (user, host_port) = match authority.rsplit_once('@') {
        Some((user, host_port)) => (Some(user.to_owned()), host_port),
        None => (None, authority),
    };
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) => {
            (host, Some(port.parse::<u16>().map_err(|_| format!("{text:?}: port {port:?} is not a number"))?))
        }
        None => (host_port, None),
    };
    let plain = |s: &str| !s.is_empty() && !s.starts_with('-') && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if !plain(host) || user.as_deref().is_some_and(|u| !plain(u)) {
        return Err(format!("{text:?}: the user or host name is empty or not plain (no spaces, no leading '-')"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("repository path {text:?} contains '..'"));
    }
    Ok(RepoUrl::Ssh { user, host: host.to_owned(), port, path: PathBuf::from(path) })
}

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoUrl::Local(path) => write!(f, "file://{}", path.display()),
            RepoUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            RepoUrl::Ssh { user, host, port, path } => {
                write!(f, "ssh://")?;
                if let Some(user) = user {
                    write!(f, "{user}@")?;
                }
                write!(f, "{host}")?;
                if let Some(port) = port {
                    write!(f, ":{port}")?;
                }
                write!(f, "{}", path.display())
            }
        }
    }
}

/// The `[ssh]` table, resolved. Anything unset is left to ssh itself: the user's `~/.ssh/config`,
/// agent, keys and `known_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshConfig {
    pub identity_file: Option<PathBuf>,
    pub known_hosts_file: Option<PathBuf>,
    pub port: Option<u16>,
    pub connect_timeout: Duration,
    pub keepalive: Duration,
    /// Accept a server without the fsync@openssh.com extension (no durability guarantee).
    pub allow_no_fsync: bool,
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            identity_file: None,
            known_hosts_file: None,
            port: None,
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            allow_no_fsync: false,
        }
    }
}

pub const DEFAULT_S3_PART_SIZE: u64 = 16 << 20;
/// S3's smallest part (all but the last) and largest part.
pub const S3_PART_SIZES: std::ops::RangeInclusive<u64> = (5 << 20)..=(5 << 30);
pub const DEFAULT_S3_UPLOAD_CONCURRENCY: usize = 4;
pub const DEFAULT_S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_S3_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Server-side encryption requested for new objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSideEncryption {
    Aes256,
    Kms { key_id: Option<String> },
}

/// The `[s3]` table, resolved. Everything left unset falls back to the AWS SDK's own sources: the
/// standard environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, ...),
/// the shared config and credentials files, web identity and instance metadata.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub force_path_style: bool,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub storage_class: Option<String>,
    pub sse: Option<ServerSideEncryption>,
    pub part_size: u64,
    pub upload_concurrency: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            force_path_style: false,
            access_key_id: None,
            secret_access_key: None,
            storage_class: None,
            sse: None,
            part_size: DEFAULT_S3_PART_SIZE,
            upload_concurrency: DEFAULT_S3_UPLOAD_CONCURRENCY,
            connect_timeout: DEFAULT_S3_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_S3_READ_TIMEOUT,
        }
    }
}

/// Never prints the secret, so a configuration can be logged with `-v` safely.
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("force_path_style", &self.force_path_style)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .field("storage_class", &self.storage_class)
            .field("sse", &self.sse)
            .field("part_size", &self.part_size)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .finish()
    }
}

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

pub const DEFAULT_LOOK_AHEAD: usize = 16;
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

pub const DEFAULT_PREFETCH: usize = 16;
pub const DEFAULT_FETCH_PARALLEL: usize = 4;
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

#[derive(Debug, Clone)]
pub struct Config {
    pub repo: RepoUrl,
    /// The configuration file this came from, if any: base-fetch hands it on to the restore_command
    /// it writes, so that wal-fetch reads the same repository.
    pub source_file: Option<PathBuf>,
    /// Where pg_basebackup and pg_verifybackup are; `None`: found on PATH.
    pub pg_bin_dir: Option<PathBuf>,
    pub base: BaseConfig,
    pub push: PushConfig,
    pub fetch: FetchConfig,
    /// zstd level for new objects.
    pub compression_level: i32,
    /// How long one command may keep retrying transient failures before giving up.
    pub deadline: Duration,
    pub s3: S3Config,
    pub ssh: SshConfig,
}

impl Config {
    /// A string that tells this repository from any other this host might be configured with: the
    /// URL plus what the URL leaves out (the S3 endpoint and region, the SSH port). Local state that
    /// vouches for the repository (look-ahead records, prefetch spools) is keyed by it, so that
    /// pointing the configuration at another store never inherits such state.
    pub fn repository_identity(&self) -> String {
        match &self.repo {
            RepoUrl::Local(_) => self.repo.to_string(),
            RepoUrl::S3 { .. } => {
                let env_endpoint = std::env::var("AWS_ENDPOINT_URL_S3").or_else(|_| std::env::var("AWS_ENDPOINT_URL"));
                let endpoint = self.s3.endpoint.clone().or(env_endpoint.ok()).unwrap_or_else(|| "aws".into());
                let region = self.s3.region.clone().or(std::env::var("AWS_REGION").ok()).unwrap_or_default();
                format!("{} endpoint={endpoint} region={region}", self.repo)
            }
            RepoUrl::Ssh { .. } => match self.ssh.port {
                Some(port) => format!("{} port={port}", self.repo),
                None => self.repo.to_string(),
            },
        }
    }
}

/// What the command line says about configuration.
#[derive(Debug, Clone, Default)]
pub struct ConfigFlags {
    pub config_file: Option<PathBuf>,
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
    s3: Option<S3File>,
    ssh: Option<SshFile>,
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
struct SshFile {
    identity_file: Option<PathBuf>,
    known_hosts_file: Option<PathBuf>,
    port: Option<u16>,
    connect_timeout_secs: Option<u64>,
    keepalive_secs: Option<u64>,
    allow_no_fsync: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct S3File {
    endpoint: Option<String>,
    region: Option<String>,
    force_path_style: Option<bool>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    storage_class: Option<String>,
    sse: Option<String>,
    sse_kms_key_id: Option<String>,
    part_size: Option<ByteSize>,
    upload_concurrency: Option<usize>,
    connect_timeout_secs: Option<u64>,
    read_timeout_secs: Option<u64>,
}

/// A size given as a number of bytes or a string with a binary unit (`"16MiB"`, `"1GiB"`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(try_from = "toml::Value")]
struct ByteSize(u64);

impl TryFrom<toml::Value> for ByteSize {
    type Error = String;

    fn try_from(value: toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::Integer(n) if n > 0 => Ok(ByteSize(n as u64)),
            toml::Value::String(text) => {
                let trimmed = text.trim();
                let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
                let (number, unit) = trimmed.split_at(split);
                let multiplier: u64 = match unit.trim() {
                    "" | "B" => 1,
                    "KiB" => 1 << 10,
                    "MiB" => 1 << 20,
                    "GiB" => 1 << 30,
                    _ => return Err(format!("size {text:?}: use bytes or a KiB, MiB or GiB suffix")),
                };
                number
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| n.checked_mul(multiplier))
                    .filter(|n| *n > 0)
                    .map(ByteSize)
                    .ok_or_else(|| format!("size {text:?} is not a positive number"))
            }
            other => Err(format!("a size cannot be a {}: use bytes or a string such as \"16MiB\"", other.type_str())),
        }
    }
}

fn resolve_base(file: Option<BaseFile>, file_label: &dyn Fn() -> String) -> Result<BaseConfig, Error> {
    let Some(file) = file else { return Ok(BaseConfig::default()) };
    let bad = |message: String| Error::Config { source_name: format!("{} [base]", file_label()), message };
    let defaults = BaseConfig::default();
    let part_size = file.part_size.map_or(defaults.part_size, |size| size.0);
    if !BASE_PART_SIZES.contains(&part_size) {
        return Err(bad(format!("part_size = {part_size} bytes: expected 1 MiB to 64 GiB")));
    }
    let compression_workers = file.compression_workers.unwrap_or(defaults.compression_workers);
    if compression_workers > 256 {
        return Err(bad(format!("compression_workers = {compression_workers}: expected 0 (one per core) to 256")));
    }
    let transfer_concurrency = file.transfer_concurrency.unwrap_or(defaults.transfer_concurrency);
    if !(1..=64).contains(&transfer_concurrency) {
        return Err(bad(format!("transfer_concurrency = {transfer_concurrency}: expected 1 to 64")));
    }
    let progress_interval = match file.progress_interval_secs {
        None => defaults.progress_interval,
        Some(0) => return Err(bad("progress_interval_secs must be at least 1".into())),
        Some(secs) => Duration::from_secs(secs),
    };
    let spool_dir = match file.spool_dir {
        Some(dir) if !dir.is_absolute() => {
            return Err(bad(format!("spool_dir = {:?} must be an absolute path", dir.display().to_string())));
        }
        Some(dir) => dir,
        None => defaults.spool_dir,
    };
    Ok(BaseConfig { part_size, compression_workers, transfer_concurrency, progress_interval, spool_dir })
}

fn resolve_push(file: Option<PushFile>, file_label: &dyn Fn() -> String) -> Result<PushConfig, Error> {
    let Some(file) = file else { return Ok(PushConfig::default()) };
    let bad = |message: String| Error::Config { source_name: format!("{} [push]", file_label()), message };
    let look_ahead = file.look_ahead.unwrap_or(DEFAULT_LOOK_AHEAD);
    if look_ahead > 256 {
        return Err(bad(format!("look_ahead = {look_ahead}: expected 0 (off) to 256")));
    }
    let parallel = file.parallel.unwrap_or(DEFAULT_PUSH_PARALLEL);
    if !(1..=64).contains(&parallel) {
        return Err(bad(format!("parallel = {parallel}: expected 1 to 64")));
    }
    Ok(PushConfig { look_ahead, parallel })
}

fn resolve_fetch(file: Option<FetchFile>, file_label: &dyn Fn() -> String) -> Result<FetchConfig, Error> {
    let Some(file) = file else { return Ok(FetchConfig::default()) };
    let bad = |message: String| Error::Config { source_name: format!("{} [fetch]", file_label()), message };
    let prefetch = file.prefetch.unwrap_or(DEFAULT_PREFETCH);
    if prefetch > 256 {
        return Err(bad(format!("prefetch = {prefetch}: expected 0 (off) to 256")));
    }
    let parallel = file.parallel.unwrap_or(DEFAULT_FETCH_PARALLEL);
    if !(1..=64).contains(&parallel) {
        return Err(bad(format!("parallel = {parallel}: expected 1 to 64")));
    }
    let prefetch_idle = match file.prefetch_idle_secs {
        None => DEFAULT_PREFETCH_IDLE,
        Some(0) => return Err(bad("prefetch_idle_secs must be at least 1".into())),
        Some(secs) => Duration::from_secs(secs),
    };
    Ok(FetchConfig { prefetch, parallel, prefetch_idle })
}

fn resolve_ssh(file: Option<SshFile>, file_label: &dyn Fn() -> String) -> Result<SshConfig, Error> {
    let Some(file) = file else { return Ok(SshConfig::default()) };
    let bad = |message: String| Error::Config { source_name: format!("{} [ssh]", file_label()), message };
    let defaults = SshConfig::default();
    let seconds = |value: Option<u64>, name: &str, default: Duration| match value {
        None => Ok(default),
        Some(0) => Err(bad(format!("{name} must be at least 1"))),
        Some(secs) => Ok(Duration::from_secs(secs)),
    };
    for (name, path) in [("identity_file", &file.identity_file), ("known_hosts_file", &file.known_hosts_file)] {
        if path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return Err(bad(format!("{name} must be an absolute path")));
        }
    }
    Ok(SshConfig {
        identity_file: file.identity_file,
        known_hosts_file: file.known_hosts_file,
        port: file.port,
        connect_timeout: seconds(file.connect_timeout_secs, "connect_timeout_secs", defaults.connect_timeout)?,
        keepalive: seconds(file.keepalive_secs, "keepalive_secs", defaults.keepalive)?,
        allow_no_fsync: file.allow_no_fsync.unwrap_or(false),
    })
}

fn resolve_s3(file: Option<S3File>, file_label: &dyn Fn() -> String) -> Result<S3Config, Error> {
    let Some(file) = file else { return Ok(S3Config::default()) };
    let bad = |message: String| Error::Config { source_name: format!("{} [s3]", file_label()), message };
    let defaults = S3Config::default();
    let sse = match (file.sse.as_deref(), file.sse_kms_key_id) {
        (None, None) => None,
        (Some("AES256"), None) => Some(ServerSideEncryption::Aes256),
        (Some("aws:kms"), key_id) => Some(ServerSideEncryption::Kms { key_id }),
        (Some("AES256") | None, Some(_)) => return Err(bad("sse_kms_key_id needs sse = \"aws:kms\"".into())),
        (Some(other), _) => return Err(bad(format!("sse = {other:?}: expected \"AES256\" or \"aws:kms\""))),
    };
    let part_size = file.part_size.map_or(defaults.part_size, |size| size.0);
    if !S3_PART_SIZES.contains(&part_size) {
        return Err(bad(format!("part_size = {part_size} bytes: S3 takes parts from 5 MiB to 5 GiB")));
    }
    let upload_concurrency = file.upload_concurrency.unwrap_or(defaults.upload_concurrency);
    if !(1..=64).contains(&upload_concurrency) {
        return Err(bad(format!("upload_concurrency = {upload_concurrency}: expected 1 to 64")));
    }
    let seconds = |value: Option<u64>, name: &str, default: Duration| match value {
        None => Ok(default),
        Some(0) => Err(bad(format!("{name} must be at least 1"))),
        Some(secs) => Ok(Duration::from_secs(secs)),
    };
    if file.access_key_id.is_some() != file.secret_access_key.is_some() {
        return Err(bad("access_key_id and secret_access_key go together".into()));
    }
    if let Some(endpoint) = &file.endpoint
        && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
    {
        return Err(bad(format!("endpoint {endpoint:?} must start with http:// or https://")));
    }
    Ok(S3Config {
        endpoint: file.endpoint,
        region: file.region,
        force_path_style: file.force_path_style.unwrap_or(false),
        access_key_id: file.access_key_id,
        secret_access_key: file.secret_access_key,
        storage_class: file.storage_class,
        sse,
        part_size,
        upload_concurrency,
        connect_timeout: seconds(file.connect_timeout_secs, "connect_timeout_secs", defaults.connect_timeout)?,
        read_timeout: seconds(file.read_timeout_secs, "read_timeout_secs", defaults.read_timeout)?,
    })
}

impl Config {
    /// Resolves the configuration from flags, the process environment and the file system.
    pub fn load(flags: &ConfigFlags) -> Result<Config, Error> {
        Self::load_with(flags, |name| std::env::var(name).ok(), Path::new(DEFAULT_CONFIG_PATH))
    }

    /// [`Config::load`] with the environment and default path given, for tests.
    pub fn load_with(
        flags: &ConfigFlags,
        env: impl Fn(&str) -> Option<String>,
        default_path: &Path,
    ) -> Result<Config, Error> {
        let explicit = flags
            .config_file
            .clone()
            .map(|p| (p, "--config"))
            .or_else(|| env(ENV_CONFIG).filter(|v| !v.is_empty()).map(|v| (PathBuf::from(v), ENV_CONFIG)));
        let (file, file_name) = match explicit {
            Some((path, origin)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| Error::Config {
                    source_name: path.display().to_string(),
                    message: format!("cannot read the configuration file named by {origin}: {e}"),
                })?;
                (parse_file(&path, &text)?, Some(path))
            }
            None if default_path.exists() => {
                let text = std::fs::read_to_string(default_path).map_err(|e| Error::Config {
                    source_name: default_path.display().to_string(),
                    message: format!("cannot read: {e}"),
                })?;
                (parse_file(default_path, &text)?, Some(default_path.to_owned()))
            }
            None => (FileConfig::default(), None),
        };
        let file_label = || file_name.as_ref().map_or("configuration".to_owned(), |p| p.display().to_string());

        let (repo_text, repo_origin) = if let Some(repo) = &flags.repo {
            (repo.clone(), "--repo".to_owned())
        } else if let Some(repo) = env(ENV_REPO).filter(|v| !v.is_empty()) {
            (repo, ENV_REPO.to_owned())
        } else if let Some(repo) = file.repo.clone() {
            (repo, file_label())
        } else {
            return Err(Error::Config {
                source_name: "configuration".into(),
                message: format!(
                    "no repository configured: pass --repo, set {ENV_REPO}, or set repo in a configuration \
                     file (--config, {ENV_CONFIG}, or {DEFAULT_CONFIG_PATH})"
                ),
            });
        };
        let repo = RepoUrl::parse(&repo_text).map_err(|message| Error::Config { source_name: repo_origin, message })?;

        let compression_level = file.compression_level.unwrap_or(DEFAULT_COMPRESSION_LEVEL);
        if !COMPRESSION_LEVELS.contains(&compression_level) {
            return Err(Error::Config {
                source_name: file_label(),
                message: format!(
                    "compression_level = {compression_level} is out of range ({} to {})",
                    COMPRESSION_LEVELS.start(),
                    COMPRESSION_LEVELS.end()
                ),
            });
        }
        let deadline = match file.deadline_secs {
            None => DEFAULT_DEADLINE,
            Some(0) => {
                return Err(Error::Config {
                    source_name: file_label(),
                    message: "deadline_secs must be at least 1".into(),
                });
            }
            Some(secs) => Duration::from_secs(secs),
        };
        if let Some(dir) = &file.pg_bin_dir
            && !dir.is_absolute()
        {
            return Err(Error::Config {
                source_name: file_label(),
                message: format!("pg_bin_dir = {:?} must be an absolute path", dir.display().to_string()),
            });
        }
        let base = resolve_base(file.base, &file_label)?;
        let push = resolve_push(file.push, &file_label)?;
        let fetch = resolve_fetch(file.fetch, &file_label)?;
        let s3 = resolve_s3(file.s3, &file_label)?;
        let ssh = resolve_ssh(file.ssh, &file_label)?;
        Ok(Config {
            repo,
            source_file: file_name,
            pg_bin_dir: file.pg_bin_dir,
            base,
            push,
            fetch,
            compression_level,
            deadline,
            s3,
            ssh,
        })
    }
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
        for (table, needle) in [
            ("pg_bin_dir = 'bin'", "pg_bin_dir"),
            ("[base]\npart_size = '512KiB'", "part_size"),
            ("[base]\ncompression_workers = 1000", "compression_workers"),
            ("[base]\ntransfer_concurrency = 0", "transfer_concurrency"),
            ("[base]\nprogress_interval_secs = 0", "progress_interval_secs"),
            ("[base]\nspool_dir = 'tmp'", "spool_dir"),
            ("[base]\nspool = '/tmp'", "spool"),
        ] {
            let err = load(ConfigFlags::default(), &[], Some(&format!("repo = '/r'\n{table}\n"))).unwrap_err();
            assert!(err.to_string().contains(needle), "{table}: {err}");
            assert_eq!(err.exit_code(), crate::error::ExitCode::Config, "{table}");
        }
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
        for (table, needle) in [
            ("[push]\nlook_ahead = 1000", "look_ahead"),
            ("[push]\nparallel = 0", "parallel"),
            ("[push]\nlookahead = 4", "lookahead"),
            ("[fetch]\nprefetch = 1000", "prefetch"),
            ("[fetch]\nparallel = 65", "parallel"),
            ("[fetch]\nprefetch_idle_secs = 0", "prefetch_idle_secs"),
            ("[fetch]\nprefetch = -1", "prefetch"),
        ] {
            let err = load(ConfigFlags::default(), &[], Some(&format!("repo = '/r'\n{table}\n"))).unwrap_err();
            assert!(err.to_string().contains(needle), "{table}: {err}");
            assert_eq!(err.exit_code(), crate::error::ExitCode::Config, "{table}");
        }
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
    fn s3_urls_and_settings() {
        assert_eq!(
            RepoUrl::parse("s3://my-bucket/some/prefix/").unwrap(),
            RepoUrl::S3 { bucket: "my-bucket".into(), prefix: "some/prefix".into() }
        );
        assert_eq!(RepoUrl::parse("s3://my-bucket").unwrap().to_string(), "s3://my-bucket");
        for bad in ["s3://", "s3://Upper/x", "s3://ab", "s3://b-u-c/../x", "s3://bucket/a//b"] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad}");
        }
        let config = load(
            ConfigFlags::default(),
            &[],
            Some(
                "repo = 's3://walship/db1'\n[s3]\nendpoint = 'http://127.0.0.1:9000'\nregion = 'eu-west-1'\n\
                 force_path_style = true\naccess_key_id = 'AK'\nsecret_access_key = 'SECRET'\n\
                 storage_class = 'STANDARD_IA'\nsse = 'aws:kms'\nsse_kms_key_id = 'k1'\npart_size = '8MiB'\n\
                 upload_concurrency = 2\nconnect_timeout_secs = 2\nread_timeout_secs = 3\n",
            ),
        )
        .unwrap();
        let s3 = &config.s3;
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(s3.force_path_style);
        assert_eq!(s3.part_size, 8 << 20);
        assert_eq!(s3.sse, Some(ServerSideEncryption::Kms { key_id: Some("k1".into()) }));
        assert_eq!((s3.connect_timeout, s3.read_timeout), (Duration::from_secs(2), Duration::from_secs(3)));
        let printed = format!("{config:?}");
        assert!(!printed.contains("SECRET") && printed.contains("redacted"), "{printed}");
        for (table, needle) in [
            ("part_size = 1024", "part_size"),
            ("part_size = '16 furlongs'", "part_size"),
            ("sse = 'DES'", "sse"),
            ("sse_kms_key_id = 'k'", "sse_kms_key_id"),
            ("access_key_id = 'AK'", "secret_access_key"),
            ("endpoint = '127.0.0.1:9000'", "endpoint"),
            ("upload_concurrency = 0", "upload_concurrency"),
            ("read_timeout_secs = 0", "read_timeout_secs"),
        ] {
            let err =
                load(ConfigFlags::default(), &[], Some(&format!("repo = 's3://b-1/p'\n[s3]\n{table}\n"))).unwrap_err();
            assert!(err.to_string().contains(needle), "{table}: {err}");
        }
    }

    #[test]
    fn ssh_urls_and_settings() {
        assert_eq!(
            RepoUrl::parse("ssh://backup@db-archive:2222/srv/walship").unwrap(),
            RepoUrl::Ssh {
                user: Some("backup".into()),
                host: "db-archive".into(),
                port: Some(2222),
                path: "/srv/walship".into()
            }
        );
        assert_eq!(RepoUrl::parse("ssh://host/srv/w").unwrap().to_string(), "ssh://host/srv/w");
        for bad in ["ssh://host", "ssh://host:x/p", "ssh://-oProxyCommand=x/p", "ssh://a b/p", "ssh://h/a/../b"] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad}");
        }
        let config = load(
            ConfigFlags::default(),
            &[],
            Some(
                "repo = 'ssh://h/p'\n[ssh]\nidentity_file = '/k'\nknown_hosts_file = '/kh'\nport = 2200\n\
                 connect_timeout_secs = 3\nkeepalive_secs = 4\nallow_no_fsync = true\n",
            ),
        )
        .unwrap();
        assert_eq!(config.ssh.port, Some(2200));
        assert_eq!(
            (config.ssh.connect_timeout, config.ssh.keepalive),
            (Duration::from_secs(3), Duration::from_secs(4))
        );
        assert!(config.ssh.allow_no_fsync);
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
