//! The cluster-less fixture of the command-line contract tests: a [`Repository`] of any kind next to a
//! data directory whose `pg_wal` holds synthetic WAL files, and the binaries run from that data
//! directory as archive_command and restore_command run them. One fixture for every backend, so
//! that a scenario is written once and runs on local disk, S3 and SSH alike.
//!
//! Every command is waited for with a bound (a hang fails the test instead of stalling the suite),
//! and on SSH every command must leave no `ssh` client behind (it would pile up under
//! archive_command).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::assertions::{assert_no_temp_files, assert_ok};
use crate::datadir::FakeDataDir;
use crate::proxy::Proxy;
use crate::repository::{Backend, ConfigLines, Repository};
use crate::running::{Running, finish, spawn};
use crate::s3::write_config_file;
use crate::segments::{self, wal_key};
use crate::{Output, Scratch, walship};

/// Where PostgreSQL asks restore_command to put most files.
pub const RECOVERYXLOG: &str = "pg_wal/RECOVERYXLOG";
/// How long past its deadline a command may take before the test calls it hung.
pub const HANG_MARGIN: Duration = Duration::from_secs(30);

/// A repository next to a data directory (see the module documentation). It derefs to its
/// [`FakeDataDir`]: `scratch` (which also holds the configuration files and a local repository),
/// `data`, `wal`, `write_segment`, `write_wal_file`.
pub struct Fixture {
    dir: FakeDataDir,
    /// The repository the commands archive into and restore from.
    pub repo: Repository,
    /// The arguments that select the repository for the helpers that take no configuration.
    selected: Vec<OsString>,
    configs: AtomicU32,
}

impl Fixture {
    /// A fixture on a new repository of kind `backend`; `label` names its scratch directory.
    pub fn new(backend: Backend, label: &str) -> Fixture {
        Fixture::with_repository(&format!("{}-{label}", backend.label()), |scratch| Repository::new(backend, scratch))
    }

    /// A fixture on a repository in the directory of `server`, an sshd started by the caller (one
    /// whose sftp-server refuses some requests, say).
    pub fn new_on_ssh(label: &str, server: crate::ssh::SshServer) -> Fixture {
        Fixture::with_repository(label, |scratch| Repository::ssh_on(scratch, server))
    }

    /// A fixture on the repository `make` creates in the fixture's scratch directory.
    pub fn with_repository(label: &str, make: impl FnOnce(&Scratch) -> Repository) -> Fixture {
        let dir = FakeDataDir::new(label);
        let repo = make(&dir.scratch);
        let selected = repo.cli_args();
        Fixture { dir, repo, selected, configs: AtomicU32::new(0) }
    }

    /// Which kind of store the repository is.
    pub fn backend(&self) -> Backend {
        self.repo.backend()
    }

    /// On S3, starts a fault-injecting proxy in front of the server and selects a configuration that
    /// goes through it; `None` (and nothing changes) on the other backends.
    pub fn through_proxy(&mut self) -> Option<Proxy> {
        let proxy = Proxy::start(self.repo.s3_server()?.port());
        let config = self.config(ConfigLines { endpoint: Some(&proxy.endpoint()), ..ConfigLines::default() });
        self.select(&config);
        Some(proxy)
    }

    /// The requests `proxy` saw that would create or replace the object `key`: a PUT or a multipart
    /// upload of it.
    pub fn writes_to(&self, proxy: &Proxy, key: &str) -> Vec<String> {
        let path = self.repo.request_path(key);
        proxy
            .seen()
            .iter()
            .filter(|s| s.request.path() == path && matches!(s.method.as_str(), "PUT" | "POST"))
            .map(|s| format!("{} {}", s.method, s.target))
            .collect()
    }

    /// From now on the helpers that take no configuration use `config`.
    pub fn select(&mut self, config: &Path) {
        self.selected = vec!["--config".into(), config.into()];
    }

    /// Writes a new configuration file for the repository with `lines`.
    pub fn config(&self, lines: ConfigLines) -> PathBuf {
        self.config_text(&self.repo.config_text(lines))
    }

    /// [`config`](Self::config) with `extra` lines added to the backend's table (`[s3]`, `[ssh]`).
    pub fn config_adding(&self, lines: ConfigLines, extra: &str) -> PathBuf {
        self.config(ConfigLines { backend: &format!("{}\n{extra}", lines.backend), ..lines })
    }

    /// Writes `text` as a new configuration file.
    pub fn config_text(&self, text: &str) -> PathBuf {
        let n = self.configs.fetch_add(1, Ordering::SeqCst);
        write_config_file(self.scratch.path(), &format!("walship-{n}.toml"), text)
    }

    /// One of our binaries, run from `cwd`; on SSH with the server's scratch HOME, so that nobody's
    /// real `~/.ssh` takes part.
    pub fn command(&self, program: &str, cwd: &Path) -> Command {
        let mut cmd = walship(program);
        cmd.current_dir(cwd);
        if let Some(server) = self.repo.ssh_server() {
            cmd.env("HOME", server.client_home());
        }
        cmd
    }

    fn repo_args(&self, config: Option<&Path>) -> Vec<OsString> {
        config.map_or_else(|| self.selected.clone(), |config| vec!["--config".into(), config.into()])
    }

    /// `wal-push REPO pg_wal/<name> <name>` from the data directory, with `config` or the selected
    /// repository.
    pub fn push_cmd(&self, config: Option<&Path>, name: &str) -> Command {
        self.push_cmd_from(&self.data, config, &format!("pg_wal/{name}"), Some(name))
    }

    /// `wal-push REPO FILE [NAME]` from `data`.
    pub fn push_cmd_from(&self, data: &Path, config: Option<&Path>, file: &str, name: Option<&str>) -> Command {
        let mut cmd = self.command("wal-push", data);
        cmd.args(self.repo_args(config)).arg(file).args(name);
        cmd
    }

    /// `wal-fetch REPO <name> pg_wal/RECOVERYXLOG` from the data directory.
    pub fn fetch_cmd(&self, config: Option<&Path>, name: &str) -> Command {
        self.fetch_cmd_in(&self.data, config, name)
    }

    /// `wal-fetch REPO <name> pg_wal/RECOVERYXLOG` run from the data directory `data`.
    pub fn fetch_cmd_in(&self, data: &Path, config: Option<&Path>, name: &str) -> Command {
        self.fetch_cmd_to(data, config, name, RECOVERYXLOG)
    }

    /// `wal-fetch REPO <name> <path>` run from `data`.
    pub fn fetch_cmd_to(&self, data: &Path, config: Option<&Path>, name: &str, path: &str) -> Command {
        let mut cmd = self.command("wal-fetch", data);
        cmd.args(self.repo_args(config)).arg(name).arg(path);
        cmd
    }

    /// Waits for `running` with `limit`, then (on SSH) checks that it left no ssh client behind.
    #[track_caller]
    pub fn finish(&self, running: Running, limit: Duration) -> Output {
        let output = finish(running, limit).output;
        self.assert_no_clients_left();
        output
    }

    /// Runs `cmd` to its end, bounded.
    #[track_caller]
    pub fn run(&self, cmd: &mut Command) -> Output {
        self.finish(spawn(cmd), HANG_MARGIN * 2)
    }

    /// `wal-push pg_wal/<name> <name>` on the selected repository.
    #[track_caller]
    pub fn push(&self, name: &str) -> Output {
        self.run(&mut self.push_cmd(None, name))
    }

    /// `wal-push pg_wal/<file> <name>` on the selected repository.
    #[track_caller]
    pub fn push_as(&self, file: &str, name: &str) -> Output {
        self.run(&mut self.push_cmd_from(&self.data, None, &format!("pg_wal/{file}"), Some(name)))
    }

    /// `wal-push --config CONFIG pg_wal/<name> <name>`.
    #[track_caller]
    pub fn push_with(&self, config: &Path, name: &str) -> Output {
        self.run(&mut self.push_cmd(Some(config), name))
    }

    /// `wal-fetch <name> pg_wal/RECOVERYXLOG` on the selected repository.
    #[track_caller]
    pub fn fetch(&self, name: &str) -> Output {
        self.run(&mut self.fetch_cmd(None, name))
    }

    /// `wal-fetch --config CONFIG <name> pg_wal/RECOVERYXLOG`.
    #[track_caller]
    pub fn fetch_with(&self, config: &Path, name: &str) -> Output {
        self.run(&mut self.fetch_cmd(Some(config), name))
    }

    /// `wal-fetch <name> pg_wal/RECOVERYXLOG` run from the data directory `data`.
    #[track_caller]
    pub fn fetch_in(&self, data: &Path, config: Option<&Path>, name: &str) -> Output {
        self.run(&mut self.fetch_cmd_in(data, config, name))
    }

    /// An `ssh` process may take a moment to go after its command exited; one still there after a
    /// few seconds was left behind. Nothing to check on other backends.
    #[track_caller]
    pub fn assert_no_clients_left(&self) {
        let Some(server) = self.repo.ssh_server() else { return };
        let started = Instant::now();
        while !server.client_processes().is_empty() && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = server.kill_clients();
        assert!(left.is_empty(), "ssh clients outlived their command: {left:#?}");
    }

    /// The file holding the repository's object of WAL file `name`.
    pub fn object(&self, name: &str) -> PathBuf {
        self.repo.object_file(&wal_key(name))
    }

    /// What the commands' messages call the object of WAL file `name`.
    pub fn location(&self, name: &str) -> String {
        self.repo.location(&wal_key(name))
    }

    /// Where wal-fetch puts a file (`pg_wal/RECOVERYXLOG` in the data directory).
    pub fn destination(&self) -> PathBuf {
        self.data.join(RECOVERYXLOG)
    }

    /// Fetches `name` and checks that exactly `expected` arrives; removes the restored file again.
    #[track_caller]
    pub fn assert_fetches(&self, name: &str, expected: &[u8]) {
        self.check_fetch(self.fetch(name), name, expected);
    }

    /// [`assert_fetches`](Self::assert_fetches) with `config`.
    #[track_caller]
    pub fn assert_fetches_with(&self, config: &Path, name: &str, expected: &[u8]) {
        self.check_fetch(self.fetch_with(config, name), name, expected);
    }

    #[track_caller]
    fn check_fetch(&self, out: Output, name: &str, expected: &[u8]) {
        assert_ok(&out, &format!("fetch {name}"));
        let restored = fs::read(self.destination()).expect("the restored file");
        assert!(restored == expected, "fetch {name}: restored {} bytes that differ from the original", restored.len());
        fs::remove_file(self.destination()).unwrap();
        assert_no_temp_files(&self.wal);
    }

    /// PostgreSQL's marker for a standby; wal-fetch reads it from its working directory.
    pub fn become_standby(&self) {
        segments::write_file(&self.data.join("standby.signal"), b"");
    }

    /// Removes the standby marker again.
    pub fn stop_being_standby(&self) {
        fs::remove_file(self.data.join("standby.signal")).unwrap();
    }

    /// A second data directory, of a standby (it holds standby.signal), so that a standby's fetch can
    /// run while another command runs in the main one.
    pub fn standby_data(&self) -> PathBuf {
        let data = self.scratch.path().join("standby");
        if !data.exists() {
            self.scratch.mkdir("standby");
            self.scratch.mkdir("standby/pg_wal");
            segments::write_file(&data.join("standby.signal"), b"");
        }
        data
    }

    /// Every file the repository holds, hidden ones included, relative to its root, sorted.
    pub fn repo_files(&self) -> Vec<String> {
        self.repo.files_under("")
    }

    /// Hidden temporary files anywhere in the repository.
    pub fn repo_temp_files(&self) -> Vec<String> {
        self.repo_files()
            .into_iter()
            .filter(|f| Path::new(f).file_name().unwrap().to_string_lossy().starts_with('.') && f.ends_with(".tmp"))
            .collect()
    }
}

impl Drop for Fixture {
    /// An encrypted repository is checked here, while the scratch directory (which holds a local
    /// repository) still exists; the repository's own drop would come after it is gone.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.repo.assert_encrypted_objects();
        }
    }
}

impl std::ops::Deref for Fixture {
    type Target = FakeDataDir;

    fn deref(&self) -> &FakeDataDir {
        &self.dir
    }
}

/// (length, mtime, inode): changes if an object is rewritten or replaced.
pub fn identity_of(path: &Path) -> (u64, SystemTime, u64) {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    (meta.len(), meta.modified().unwrap(), meta.ino())
}

/// Every path below `dir` with its size, to prove a command created, removed or changed nothing.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                pending.push(entry.path());
            }
            found.insert(entry.path(), if meta.is_dir() { 0 } else { meta.len() });
        }
    }
    found
}

/// Whether `dir` holds a temporary file of at least `bytes` bytes.
pub fn temp_file_of_at_least(dir: &Path, bytes: u64) -> bool {
    crate::assertions::temp_files(dir).iter().any(|t| fs::metadata(dir.join(t)).is_ok_and(|m| m.len() >= bytes))
}
