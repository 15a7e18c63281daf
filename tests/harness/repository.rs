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
    /// `deadline_secs` instead of the default 60 (a fault test gives up within a few seconds).
    pub deadline_secs: Option<u64>,
    /// On S3, the endpoint to talk to instead of the server's own (a fault-injecting proxy in front
    /// of it); ignored elsewhere.
    pub endpoint: Option<&'a str>,
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
    /// The backend whose [`label`](Self::label) is `label`.
    pub fn from_label(label: &str) -> Backend {
        match label {
            "local" => Backend::Local,
            "s3" => Backend::S3,
            "ssh" => Backend::Ssh,
            other => panic!("no backend is called {other:?}"),
        }
    }

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

/// [`every_backend!`](crate::every_backend) for some backends only, for a scenario that means
/// nothing on the others (a server killed mid-transfer has no local-disk counterpart; temporary files
/// beside the objects exist on local disk and SSH only): `some_backends!([s3, ssh] a, b)`.
#[macro_export]
macro_rules! some_backends {
    ([$($backend:ident),+ $(,)?]) => {};
    ([$($backend:ident),+ $(,)?] $scenario:ident $(, $($rest:ident),*)? $(,)?) => {
        mod $scenario {
            $(
                #[test]
                fn $backend() {
                    super::$scenario($crate::repository::Backend::from_label(stringify!($backend)))
                }
            )+
        }
        $crate::some_backends!([$($backend),+] $($($rest),*)?);
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
        Repository::ssh_on(store, SshServer::start())
    }

    /// [`ssh`](Self::ssh) on a server started by the caller (one whose sftp-server refuses some
    /// requests, say).
    pub fn ssh_on(store: &Scratch, server: SshServer) -> Repository {
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
        let deadline = lines.deadline_secs.map_or(TOP.to_owned(), |secs| format!("deadline_secs = {secs}"));
        let top = format!("{deadline}\n{}", lines.top);
        let text = match self {
            Repository::Local { dir } => format!("repo = \"file://{}\"\n{top}\n", dir.display()),
            Repository::S3 { server, bucket, prefix, .. } => {
                let endpoint = lines.endpoint.map_or_else(|| server.endpoint(), str::to_owned);
                server.config_text(&format!("s3://{bucket}/{prefix}"), &endpoint, &top, lines.backend)
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

    /// What the commands' messages say for the object `key`: its path on local disk, its `s3://` URL,
    /// its `ssh://` URL.
    pub fn location(&self, key: &str) -> String {
        match self {
            Repository::Local { dir } => dir.join(key).display().to_string(),
            Repository::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}/{key}"),
            Repository::Ssh { server, .. } => server.url(&server.repo_dir().join(key)),
        }
    }

    /// The directory of a repository on local disk.
    pub fn local_dir(&self) -> Option<&Path> {
        match self {
            Repository::Local { dir } => Some(dir),
            _ => None,
        }
    }

    /// The path of an S3 request for the object `key`, path style (`/BUCKET/PREFIX/key`); on other
    /// backends there are no such requests and nothing matches it.
    pub fn request_path(&self, key: &str) -> String {
        match self {
            Repository::S3 { bucket, prefix, .. } => format!("/{bucket}/{prefix}/{key}"),
            _ => String::new(),
        }
    }

    /// The S3 server, on S3.
    pub fn s3_server(&self) -> Option<&S3Server> {
        match self {
            Repository::S3 { server, .. } => Some(server),
            _ => None,
        }
    }

    /// The SSH server, on SSH.
    pub fn ssh_server(&self) -> Option<&SshServer> {
        match self {
            Repository::Ssh { server, .. } => Some(server),
            _ => None,
        }
    }

    /// Removes everything the repository holds, so that the next push starts from an empty one (the
    /// directory itself stays, with its owner and mode).
    pub fn wipe(&self) {
        let root = self.object_file("");
        let Ok(entries) = std::fs::read_dir(&root) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.unwrap_or_else(|e| panic!("remove {path:?}: {e}"));
        }
    }

    /// The repository's store as the library opens it from a configuration, to call the
    /// [`Storage`](walship::storage::Storage) trait directly. The one place that knows how the
    /// library turns a configuration into a store.
    pub fn open_storage(&self) -> Store {
        let flags = match self {
            Repository::Local { dir } => {
                walship::ConfigFlags { config_file: None, repo: Some(dir.display().to_string()) }
            }
            Repository::S3 { config, .. } | Repository::Ssh { config, .. } => {
                walship::ConfigFlags { config_file: Some(config.clone()), repo: None }
            }
        };
        let no_default = Path::new("/nonexistent/walship.toml");
        let config = walship::Config::load_with(&flags, |_| None, no_default)
            .unwrap_or_else(|e| panic!("configuration of the {}: {e}", self.describe()));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let opened = runtime.block_on(walship::storage::open(&config.repo, &config.storage));
        let storage = opened.unwrap_or_else(|e| panic!("open the {}: {e}", self.describe()));
        Store { storage: Some(storage), runtime }
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

/// A repository's store opened in this process ([`Repository::open_storage`]), with the runtime its
/// calls run on.
pub struct Store {
    /// Always `Some` until dropped; taken on drop so that it goes inside the runtime.
    storage: Option<std::sync::Arc<dyn walship::storage::Storage>>,
    runtime: tokio::runtime::Runtime,
}

impl Store {
    /// The store behind the repository.
    pub fn storage(&self) -> &dyn walship::storage::Storage {
        self.storage.as_deref().expect("open until dropped")
    }

    /// Runs one of the store's futures to its end.
    pub fn run<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // A backend may end its connection with tasks of the runtime (the SSH session).
        let _inside = self.runtime.enter();
        drop(self.storage.take());
    }
}
