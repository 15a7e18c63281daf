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
}

impl RepoUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let path = if let Some(rest) = text.strip_prefix("file://") {
            rest
        } else if let Some((scheme, _)) = text.split_once("://") {
            return Err(match scheme {
                "s3" | "ssh" => format!("{scheme}:// repositories are not supported by this build yet"),
                other => format!("unknown repository scheme {other:?}; expected file:// or an absolute path"),
            });
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

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoUrl::Local(path) => write!(f, "file://{}", path.display()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub repo: RepoUrl,
    /// zstd level for new objects.
    pub compression_level: i32,
    /// How long one command may keep retrying transient failures before giving up.
    pub deadline: Duration,
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
        Ok(Config { repo, compression_level, deadline })
    }
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, Error> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().replace('\n', " ");
        let source_name = match e.span() {
            Some(span) => {
                let line_number = text[..span.start].matches('\n').count() + 1;
                let line = text.lines().nth(line_number - 1).unwrap_or("").trim();
                // serde's type errors do not name the key; the offending line does.
                return Error::Config {
                    source_name: format!("{}:{line_number}", path.display()),
                    message: format!("{message} (in `{line}`)"),
                };
            }
            None => path.display().to_string(),
        };
        Error::Config { source_name, message }
    })
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
    fn unknown_keys_are_named_with_their_line() {
        let err = load(ConfigFlags::default(), &[], Some("repo = '/r'\ncompresion_level = 5\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("compresion_level") && text.contains("walship.toml:2"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
        let err = load(ConfigFlags::default(), &[], Some("repo = '/r'\n[s3]\nbucket = 'b'\n")).unwrap_err();
        assert!(err.to_string().contains("s3"), "{err}");
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
