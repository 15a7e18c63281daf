//! The three kinds of repository the end-to-end suites run against, behind one type: a directory on
//! local disk (named with `--repo DIR`), a bucket prefix on an s3s-fs server and a directory on a real
//! sshd (both named by a configuration file). Each one lives on this machine, so tests can look at
//! (and damage) the stored objects as plain files, the same way for all three.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::Scratch;
use crate::pg::{archive_command, archive_command_with_config, restore_command, restore_command_with_config};
use crate::s3::{S3Server, write_config_file};
use crate::ssh::SshServer;

/// The top-level settings of every configuration file written here: retries end well inside the
/// tests' waits, so a failing store shows up as a failed command.
const TOP: &str = "deadline_secs = 60";

/// Extra lines for a configuration file written by [`Repository::write_config`]. TOML wants
/// top-level keys before the first table, so each kind of line has its place.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConfigLines<'a> {
    /// Top-level keys (`pg_bin_dir = "..."`), after `repo` and `deadline_secs`.
    pub top: &'a str,
    /// Keys of the backend's own table: `[s3]` or `[ssh]`; ignored on local disk, which has none.
    pub backend: &'a str,
    /// Whole tables after everything else (`[base]\npart_size = "1MiB"`).
    pub tables: &'a str,
}

/// Which kind of store a scenario runs against; [`every_backend!`](crate::every_backend) runs one
/// scenario body once for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    S3,
    Ssh,
}

impl Backend {
    /// A short name for directory names and failure messages: `local`, `s3`, `ssh`.
    pub fn label(self) -> &'static str {
        match self {
            Backend::Local => "local",
            Backend::S3 => "s3",
            Backend::Ssh => "ssh",
        }
    }
}

/// Writes one `#[test]` per backend for each named scenario function `fn NAME(Backend)`: the tests
/// are `NAME::local`, `NAME::s3` and `NAME::ssh`, so a filter on `NAME` runs the scenario everywhere
/// and one on `::s3` runs every scenario on one backend.
#[macro_export]
macro_rules! every_backend {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn local() {
                    super::$scenario($crate::repository::Backend::Local)
                }
                #[test]
                fn s3() {
                    super::$scenario($crate::repository::Backend::S3)
                }
                #[test]
                fn ssh() {
                    super::$scenario($crate::repository::Backend::Ssh)
                }
            }
        )*
    };
}

/// The repository a scenario archives into and restores from.
pub enum Repository {
    /// A directory, named with `--repo DIR`.
    Local { dir: PathBuf },
    /// `s3://BUCKET/PREFIX` on an s3s-fs server, named by the configuration file `config`.
    S3 { server: S3Server, bucket: String, prefix: String, config: PathBuf },
    /// `ssh://postgres@127.0.0.1:PORT/DIR` on a real sshd, named by the configuration file `config`.
    Ssh { server: SshServer, config: PathBuf },
}

impl Repository {
    /// A new repository of kind `backend`, with its directory or configuration file in `store` (an
    /// S3 repository is `s3://walship/cluster` on a server of its own).
    pub fn new(backend: Backend, store: &Scratch) -> Repository {
        match backend {
            Backend::Local => Repository::local(store),
            Backend::S3 => Repository::s3(store, "walship", "cluster"),
            Backend::Ssh => Repository::ssh(store),
        }
    }

    /// Which kind of store this is.
    pub fn backend(&self) -> Backend {
        match self {
            Repository::Local { .. } => Backend::Local,
            Repository::S3 { .. } => Backend::S3,
            Repository::Ssh { .. } => Backend::Ssh,
        }
    }

    /// A repository in `dir` (created, owned by the server user).
    pub fn local(store: &Scratch) -> Repository {
        Repository::Local { dir: store.mkdir("repo") }
    }

    /// A repository under `prefix` of a new bucket on a new s3s-fs server, with its configuration
    /// file written into `store`, readable by the server user.
    pub fn s3(store: &Scratch, bucket: &str, prefix: &str) -> Repository {
        let server = S3Server::start();
        server.create_bucket(bucket);
        let url = format!("s3://{bucket}/{prefix}");
        let text = server.config_text(&url, &server.endpoint(), TOP, "");
        let config = write_config_file(store.path(), "walship.toml", &text);
        Repository::S3 { server, bucket: bucket.to_owned(), prefix: prefix.to_owned(), config }
    }

    /// A repository in a directory of a new sshd on loopback, reached over SFTP with the client key and
    /// `known_hosts` the harness made; the configuration file is written into `store`.
    pub fn ssh(store: &Scratch) -> Repository {
        let server = SshServer::start();
        let text = server.config_text(&server.repo_dir(), TOP, "");
        let config = write_config_file(store.path(), "walship.toml", &text);
        Repository::Ssh { server, config }
    }

    pub fn archive_command(&self) -> String {
        match self {
            Repository::Local { dir } => archive_command(dir),
            Repository::S3 { config, .. } | Repository::Ssh { config, .. } => archive_command_with_config(config),
        }
    }

    pub fn restore_command(&self) -> String {
        match self {
            Repository::Local { dir } => restore_command(dir),
            Repository::S3 { config, .. } | Repository::Ssh { config, .. } => restore_command_with_config(config),
        }
    }

    /// The arguments that select this repository on a walship command line: `--repo DIR` on local
    /// disk, `--config FILE` otherwise.
    pub fn cli_args(&self) -> Vec<OsString> {
        match self {
            Repository::Local { dir } => vec!["--repo".into(), dir.into()],
            Repository::S3 { config, .. } | Repository::Ssh { config, .. } => {
                vec!["--config".into(), config.into()]
            }
        }
    }

    /// The text of a configuration file for this repository, with `lines` added.
    pub fn config_text(&self, lines: ConfigLines) -> String {
        let top = format!("{TOP}\n{}", lines.top);
        let text = match self {
            Repository::Local { dir } => format!("repo = \"file://{}\"\n{top}\n", dir.display()),
            Repository::S3 { server, bucket, prefix, .. } => {
                server.config_text(&format!("s3://{bucket}/{prefix}"), &server.endpoint(), &top, lines.backend)
            }
            Repository::Ssh { server, .. } => server.config_text(&server.repo_dir(), &top, lines.backend),
        };
        format!("{text}{}\n", lines.tables)
    }

    /// Writes a configuration file `dir/name` for this repository with `lines` added, readable by
    /// the server user, and returns its path (for `--config`).
    pub fn write_config(&self, dir: &Path, name: &str, lines: ConfigLines) -> PathBuf {
        write_config_file(dir, name, &self.config_text(lines))
    }

    /// The file holding the repository's object `key`: on local disk the repository's own file, on
    /// S3 the one in which s3s-fs keeps `PREFIX/key`.
    pub fn object_file(&self, key: &str) -> PathBuf {
        match self {
            Repository::Local { dir } => dir.join(key),
            Repository::S3 { server, bucket, prefix, .. } => server.object_file(bucket, &format!("{prefix}/{key}")),
            // The ssh server is this machine: the remote directory is a local one too.
            Repository::Ssh { server, .. } => server.repo_dir().join(key),
        }
    }

    /// Every stored object whose key starts with `prefix` (`backups/`), as keys, sorted. Hidden files
    /// (temporary files of an upload under way or cut short, s3s-fs's metadata) are not objects.
    pub fn keys_under(&self, prefix: &str) -> Vec<String> {
        let root = self.object_file("");
        let mut keys: Vec<String> = crate::assertions::files_below(&root)
            .into_iter()
            .filter(|key| key.starts_with(prefix))
            .filter(|key| !key.rsplit('/').next().is_some_and(|name| name.starts_with('.')))
            .collect();
        keys.sort();
        keys
    }

    /// Every file below `prefix` (`backups/NAME/`), hidden ones included, as paths relative to the
    /// repository's root.
    pub fn files_under(&self, prefix: &str) -> Vec<String> {
        let dir = self.object_file(prefix.trim_end_matches('/'));
        crate::assertions::files_below(&dir).into_iter().map(|f| format!("{prefix}{f}")).collect()
    }

    /// For failure messages: where the repository is, and for S3 and SSH the end of the server's log.
    pub fn describe(&self) -> String {
        match self {
            Repository::Local { dir } => format!("repository {dir:?}"),
            Repository::S3 { server, bucket, prefix, config } => {
                let log = server.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                format!(
                    "repository s3://{bucket}/{prefix} at {} (config {config:?}, objects under {:?})\n\
                     --- last lines of the s3s-fs log ---\n{tail}\n---",
                    server.endpoint(),
                    server.object_file(bucket, prefix)
                )
            }
            Repository::Ssh { server, config } => {
                let log = server.log();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                format!(
                    "repository {} (config {config:?})\n--- last lines of the sshd log ---\n{tail}\n---",
                    server.url(&server.repo_dir())
                )
            }
        }
    }
}
