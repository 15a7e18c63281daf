//! The three kinds of repository the end-to-end suites run against, behind one type: a directory on
//! local disk (named with `--repo DIR`), a bucket prefix on an s3s-fs server and a directory on a real
//! sshd (both named by a configuration file). Each one lives on this machine, so tests can look at
//! (and damage) the stored objects as plain files, the same way for all three.

use std::cell::Cell;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::Scratch;
use crate::keys::{KeyPair, encryption_table};
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
///
/// `every_backend!(also_encrypted: a, b)` adds `NAME::encrypted::local`, `NAME::encrypted::s3` and
/// `NAME::encrypted::ssh`: the same body against an encrypted repository (see [`encrypted_run`]), so a
/// filter on `::encrypted::` runs every encrypted scenario (and one on `::s3` still every scenario on
/// S3).
#[macro_export]
macro_rules! every_backend {
    (also_encrypted: $($scenario:ident),* $(,)?) => {
        $crate::some_backends!(also_encrypted: [local, s3, ssh] $($scenario),*);
    };
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
/// `some_backends!(also_encrypted: [s3, ssh] a, b)` adds `NAME::encrypted::s3` and
/// `NAME::encrypted::ssh` as [`every_backend!`](crate::every_backend) does.
#[macro_export]
macro_rules! some_backends {
    (also_encrypted: [$($backend:ident),+ $(,)?]) => {};
    (also_encrypted: [$($backend:ident),+ $(,)?] $scenario:ident $(, $($rest:ident),*)? $(,)?) => {
        mod $scenario {
            $(
                #[test]
                fn $backend() {
                    super::$scenario($crate::repository::Backend::from_label(stringify!($backend)))
                }
            )+
            mod encrypted {
                $(
                    #[test]
                    fn $backend() {
                        $crate::repository::encrypted_run(
                            $crate::repository::Backend::from_label(stringify!($backend)),
                            super::super::$scenario,
                        )
                    }
                )+
            }
        }
        $crate::some_backends!(also_encrypted: [$($backend),+] $($($rest),*)?);
    };
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

thread_local! {
    /// Whether the repositories this test thread makes are encrypted ([`encrypted_run`]). Each test
    /// runs on a thread of its own (its own process under nextest), and the scenarios make their
    /// repositories on it, so the flag reaches exactly the repositories of one encrypted run.
    static ENCRYPTED_RUN: Cell<bool> = const { Cell::new(false) };
}

/// Runs `scenario` on `backend` with every repository it makes encrypted: a key pair of its own in
/// the scenario's store, and every configuration file of the repository holding both the recipient
/// and the identity file (a scenario's host archives and restores). Each repository checks, when the
/// scenario is done with it, that everything it stores but the plain JSON records is encrypted
/// ([`Repository::assert_encrypted_objects`]).
pub fn encrypted_run(backend: Backend, scenario: fn(Backend)) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ENCRYPTED_RUN.set(false);
        }
    }
    ENCRYPTED_RUN.set(true);
    let _reset = Reset;
    scenario(backend);
}

/// How an encrypted repository is read and written: its key pair, and on local disk the
/// configuration file that names the repository and holds the `[encryption]` table (local disk
/// otherwise takes `--repo DIR`, which carries no keys).
#[derive(Debug)]
pub struct Encryption {
    /// The repository's key pair, its identity file in the scenario's store.
    pub key: KeyPair,
    /// The `[encryption]` table every configuration file of the repository carries.
    pub table: String,
    /// The table the harness itself opens the repository with: the same keys, the identity in a copy
    /// owned by this process's user, since walship refuses an identity file owned by another user
    /// (the commands' one belongs to the server user).
    harness_table: String,
    /// On local disk, the configuration file naming the repository; `None` on S3 and SSH, whose own
    /// configuration file carries the table.
    local_config: Option<PathBuf>,
    /// Whether [`Repository::assert_encrypted_objects`] has run (the fixture runs it before its
    /// scratch directory, holding a local repository, goes).
    checked: Cell<bool>,
}

impl Encryption {
    /// A key pair in `store` when this thread runs an encrypted scenario, else `None`.
    fn for_this_run(store: &Scratch) -> Option<Encryption> {
        if !ENCRYPTED_RUN.get() {
            return None;
        }
        let key = KeyPair::generate(store.path(), "repository");
        let table = encryption_table(&[&key], &[&key], "");
        let own = KeyPair { identity_file: store.path().join("repository-harness.key"), ..key.clone() };
        std::fs::copy(&key.identity_file, &own.identity_file).expect("copy the identity file for the harness");
        let harness_table = encryption_table(&[&own], &[&own], "");
        Some(Encryption { key, table, harness_table, local_config: None, checked: Cell::new(false) })
    }
}

/// The repository a scenario archives into and restores from.
///
/// In an [encrypted run](encrypted_run) each kind also carries its [`Encryption`]; every command line
/// and configuration file the harness makes for it then carries the keys.
pub enum Repository {
    /// A directory, named with `--repo DIR` (with `--config FILE` when encrypted).
    Local { dir: PathBuf, encryption: Option<Encryption> },
    /// `s3://BUCKET/PREFIX` on an s3s-fs server, named by the configuration file `config`.
    S3 { server: S3Server, bucket: String, prefix: String, config: PathBuf, encryption: Option<Encryption> },
    /// `ssh://postgres@127.0.0.1:PORT/DIR` on a real sshd, named by the configuration file `config`.
    Ssh { server: SshServer, config: PathBuf, encryption: Option<Encryption> },
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
        let dir = store.mkdir("repo");
        let encryption = Encryption::for_this_run(store).map(|mut encryption| {
            let text = format!("repo = \"file://{}\"\n{TOP}\n{}", dir.display(), encryption.table);
            encryption.local_config = Some(write_config_file(store.path(), "walship.toml", &text));
            encryption
        });
        Repository::Local { dir, encryption }
    }

    /// A repository under `prefix` of a new bucket on a new s3s-fs server, with its configuration
    /// file written into `store`, readable by the server user.
    pub fn s3(store: &Scratch, bucket: &str, prefix: &str) -> Repository {
        let server = S3Server::start();
        server.create_bucket(bucket);
        let url = format!("s3://{bucket}/{prefix}");
        let encryption = Encryption::for_this_run(store);
        let text = server.config_text(&url, &server.endpoint(), TOP, "") + &tables_of(encryption.as_ref());
        let config = write_config_file(store.path(), "walship.toml", &text);
        Repository::S3 { server, bucket: bucket.to_owned(), prefix: prefix.to_owned(), config, encryption }
    }

    /// A repository in a directory of a new sshd on loopback, reached over SFTP with the client key and
    /// `known_hosts` the harness made; the configuration file is written into `store`.
    pub fn ssh(store: &Scratch) -> Repository {
        Repository::ssh_on(store, SshServer::start())
    }

    /// [`ssh`](Self::ssh) on a server started by the caller (one whose sftp-server refuses some
    /// requests, say).
    pub fn ssh_on(store: &Scratch, server: SshServer) -> Repository {
        let encryption = Encryption::for_this_run(store);
        let text = server.config_text(&server.repo_dir(), TOP, "") + &tables_of(encryption.as_ref());
        let config = write_config_file(store.path(), "walship.toml", &text);
        Repository::Ssh { server, config, encryption }
    }

    pub fn archive_command(&self) -> String {
        match (self, self.config_file()) {
            (_, Some(config)) => archive_command_with_config(config),
            (Repository::Local { dir, .. }, None) => archive_command(dir),
            (_, None) => unreachable!("S3 and SSH are always named by a configuration file"),
        }
    }

    pub fn restore_command(&self) -> String {
        match (self, self.config_file()) {
            (_, Some(config)) => restore_command_with_config(config),
            (Repository::Local { dir, .. }, None) => restore_command(dir),
            (_, None) => unreachable!("S3 and SSH are always named by a configuration file"),
        }
    }

    /// The arguments that select this repository on a walship command line: `--repo DIR` on local
    /// disk, `--config FILE` otherwise (and on local disk when encrypted: the keys are in the file).
    pub fn cli_args(&self) -> Vec<OsString> {
        match (self, self.config_file()) {
            (_, Some(config)) => vec!["--config".into(), config.into()],
            (Repository::Local { dir, .. }, None) => vec!["--repo".into(), dir.into()],
            (_, None) => unreachable!("S3 and SSH are always named by a configuration file"),
        }
    }

    /// The configuration file naming the repository, if it has one: always on S3 and SSH, on local
    /// disk when encrypted.
    fn config_file(&self) -> Option<&Path> {
        match self {
            Repository::Local { encryption, .. } => encryption.as_ref()?.local_config.as_deref(),
            Repository::S3 { config, .. } | Repository::Ssh { config, .. } => Some(config),
        }
    }

    /// The repository's encryption, in an [encrypted run](encrypted_run).
    pub fn encryption(&self) -> Option<&Encryption> {
        match self {
            Repository::Local { encryption, .. }
            | Repository::S3 { encryption, .. }
            | Repository::Ssh { encryption, .. } => encryption.as_ref(),
        }
    }

    /// Whether the repository is encrypted (made in an [encrypted run](encrypted_run)).
    pub fn is_encrypted(&self) -> bool {
        self.encryption().is_some()
    }

    /// The text of a configuration file for this repository, with `lines` added.
    pub fn config_text(&self, lines: ConfigLines) -> String {
        let deadline = lines.deadline_secs.map_or(TOP.to_owned(), |secs| format!("deadline_secs = {secs}"));
        let top = format!("{deadline}\n{}", lines.top);
        let text = match self {
            Repository::Local { dir, .. } => format!("repo = \"file://{}\"\n{top}\n", dir.display()),
            Repository::S3 { server, bucket, prefix, .. } => {
                let endpoint = lines.endpoint.map_or_else(|| server.endpoint(), str::to_owned);
                server.config_text(&format!("s3://{bucket}/{prefix}"), &endpoint, &top, lines.backend)
            }
            Repository::Ssh { server, .. } => server.config_text(&server.repo_dir(), &top, lines.backend),
        };
        // The keys go last: TOML wants top-level keys first, and `lines.tables` holds whole tables.
        format!("{text}{}\n{}", lines.tables, tables_of(self.encryption()))
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
            Repository::Local { dir, .. } => dir.join(key),
            Repository::S3 { server, bucket, prefix, .. } => server.object_file(bucket, &format!("{prefix}/{key}")),
            // The ssh server is this machine: the remote directory is a local one too.
            Repository::Ssh { server, .. } => server.repo_dir().join(key),
        }
    }

    /// What the commands' messages say for the object `key`: its path on local disk, its `s3://` URL,
    /// its `ssh://` URL.
    pub fn location(&self, key: &str) -> String {
        match self {
            Repository::Local { dir, .. } => dir.join(key).display().to_string(),
            Repository::S3 { bucket, prefix, .. } => format!("s3://{bucket}/{prefix}/{key}"),
            Repository::Ssh { server, .. } => server.url(&server.repo_dir().join(key)),
        }
    }

    /// The directory of a repository on local disk.
    pub fn local_dir(&self) -> Option<&Path> {
        match self {
            Repository::Local { dir, .. } => Some(dir),
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
        let config = self.load_config();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let opened = runtime.block_on(walship::storage::open(&config.repo, &config.storage));
        let storage = opened.unwrap_or_else(|e| panic!("open the {}: {e}", self.describe()));
        Store { storage: Some(storage), runtime }
    }

    /// The configuration the commands load for this repository (with its keys, when encrypted).
    fn load_config(&self) -> walship::Config {
        let flags = match (self.encryption(), self.config_file()) {
            (Some(encryption), _) => {
                let text =
                    self.config_text(ConfigLines::default()).replace(&encryption.table, &encryption.harness_table);
                let dir = encryption.key.identity_file.parent().expect("the identity file is in the store");
                let config = dir.join("walship-harness.toml");
                std::fs::write(&config, text).unwrap_or_else(|e| panic!("{config:?}: {e}"));
                walship::ConfigFlags { config_file: Some(config), repo: None }
            }
            (None, Some(config)) => walship::ConfigFlags { config_file: Some(config.to_owned()), repo: None },
            (None, None) => {
                let dir = self.local_dir().expect("S3 and SSH are always named by a configuration file");
                walship::ConfigFlags { config_file: None, repo: Some(dir.display().to_string()) }
            }
        };
        let no_default = Path::new("/nonexistent/walship.toml");
        walship::Config::load_with(&flags, |_| None, no_default)
            .unwrap_or_else(|e| panic!("configuration of the {}: {e}", self.describe()))
    }

    /// Runs `work` on the repository as the library opens it from the commands' configuration, keys
    /// and all: the one way the harness reads or makes objects itself, so that it works on an
    /// encrypted repository as on a plain one.
    fn with_library<T>(&self, work: impl AsyncFnOnce(&walship::repo::Repository) -> T) -> T {
        let config = self.load_config();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let repo = walship::repo::Repository::open(&config)
                .await
                .unwrap_or_else(|e| panic!("open the {}: {e}", self.describe()));
            let result = work(&repo).await;
            // A backend may end its connection with tasks of the runtime (the SSH session).
            drop(repo);
            result
        })
    }

    /// `content` as a complete object of this repository, made with its writer pipeline (encrypted
    /// exactly when the repository is), to plant beside the objects the commands wrote. The
    /// repository must already have taken a push: on a new one the writer would first record its
    /// encryption.
    pub fn encode_object(&self, content: &[u8]) -> Vec<u8> {
        self.with_library(async |repo| {
            let pipeline = repo.writer_pipeline(1).await.unwrap_or_else(|e| panic!("writer pipeline: {e}"));
            let mut encoded = Vec::new();
            pipeline.encode(content, &mut encoded).unwrap_or_else(|e| panic!("encode: {e}"));
            encoded
        })
    }

    /// What the stored object `key` holds, decoded and checked with the repository's reader pipeline
    /// (its keys, when encrypted).
    pub fn decode_object(&self, key: &str) -> Vec<u8> {
        let path = self.object_file(key);
        let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        self.with_library(async |repo| {
            repo.reader_pipeline().decode_bytes(&stored).unwrap_or_else(|e| panic!("decode {key}: {e}"))
        })
    }

    /// Asserts that every object the repository stores is encrypted (format 2, zstd then age), but
    /// the records that are plain JSON by design: `repository.json`, `encryption.json`, everything
    /// under `catalog/` (catalog records, pins, expiry marks, claims) and `*.json` (a backup's
    /// `owner.json`); and that the encryption record is there once anything is. Panics naming the
    /// first object that is not. Nothing to check on a plain repository.
    pub fn assert_encrypted_objects(&self) {
        let Some(encryption) = self.encryption() else { return };
        encryption.checked.set(true);
        let keys = self.keys_under("");
        let encrypted: Vec<&String> = keys.iter().filter(|key| !is_plain_by_design(key)).collect();
        for key in &encrypted {
            let path = self.object_file(key);
            let mut header = [0u8; 16];
            let read = std::fs::File::open(&path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header));
            read.unwrap_or_else(|e| panic!("object {key} of the encrypted {}: 16 header bytes: {e}", self.describe()));
            assert!(
                is_encrypted_header(&header),
                "object {key} of the encrypted {} is not an encrypted object: header {header:02x?}",
                self.describe()
            );
        }
        if !keys.is_empty() {
            assert!(
                keys.iter().any(|k| k == "encryption.json"),
                "no encryption.json in the encrypted {}",
                self.describe()
            );
        }
        eprintln!("{} encrypted objects checked in the {}", encrypted.len(), self.describe_short());
    }

    /// Where the repository is, in one line.
    fn describe_short(&self) -> String {
        match self {
            Repository::Local { dir, .. } => format!("repository {dir:?}"),
            Repository::S3 { bucket, prefix, .. } => format!("repository s3://{bucket}/{prefix}"),
            Repository::Ssh { server, .. } => format!("repository {}", server.url(&server.repo_dir())),
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
            Repository::Local { dir, .. } => format!("repository {dir:?}"),
            Repository::S3 { server, bucket, prefix, config, .. } => {
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
            Repository::Ssh { server, config, .. } => {
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

/// The `[encryption]` table of `encryption`, for the end of a configuration file; nothing without.
fn tables_of(encryption: Option<&Encryption>) -> String {
    encryption.map_or_else(String::new, |encryption| format!("\n{}\n", encryption.table))
}

/// The records a repository keeps as plain JSON whether it is encrypted or not (README "Repository
/// layout"): the identity and encryption records, the catalog, and a backup's `owner.json`.
fn is_plain_by_design(key: &str) -> bool {
    key.starts_with("catalog/") || key.ends_with(".json")
}

/// The first 16 bytes of an encrypted object: the magic, format version 2 (little-endian), the zstd
/// stage (1), then the age stage (2), and no further stage.
fn is_encrypted_header(header: &[u8; 16]) -> bool {
    header[..8] == *walship::codec::HEADER_MAGIC
        && u16::from_le_bytes([header[8], header[9]]) == 2
        && header[10] == 1
        && header[11] == 2
        && header[12..16] == [0; 4]
}

impl Drop for Repository {
    /// An encrypted run checks its repository when the scenario is done with it (unless the
    /// scenario failed already, or the fixture checked before its scratch directory went).
    fn drop(&mut self) {
        let due = self.encryption().is_some_and(|e| !e.checked.get());
        if due && !std::thread::panicking() {
            self.assert_encrypted_objects();
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
