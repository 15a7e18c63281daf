//! A repository on another machine, reached with the system's OpenSSH client and SFTP.
//!
//! The system `ssh` is used, not a library SSH stack, so that what operators rely on applies: their
//! `~/.ssh/config`, agent, keys and `known_hosts`. It runs as our own child (`ssh -s host sftp`) with
//! its standard input and output as the SFTP channel: one connection serves all the work of one
//! command, and it cannot outlive us (no ControlMaster; `ControlPath=none`). Host keys are always
//! verified (`StrictHostKeyChecking=yes`, `BatchMode=yes`); there is no option to accept any key.
//!
//! Publishing mirrors the local backend: a hidden temporary file in the object's directory, made
//! durable with the `fsync@openssh.com` extension (a server without it is refused unless
//! `allow_no_fsync` says otherwise), then linked to its name with `hardlink@openssh.com`, which like
//! link(2) refuses an existing name. (SFTP's posix-rename would replace one.)
//!
//! A new name is durable once its directory is: after the link the object's directory is fsynced,
//! and so is the parent of every directory created for it. `fsync@openssh.com` takes a file handle;
//! OpenSSH's sftp-server (`process_extended_fsync`) fsyncs any handle that `open` made (`handle_to_fd`
//! gives none for an `opendir` handle), and `open(dir, O_RDONLY)` works on Linux. The client library
//! sent fsync only on handles opened for writing, which a directory cannot be; the workspace builds it
//! with that check removed (`vendor/openssh-sftp-client`, see `[patch.crates-io]`). A failed fsync,
//! of a file or a directory, fails the write.
//!
//! Batch deletes (expiry) go several at a time over the one channel, remove the directories they
//! emptied (never the layout's own) and fsync each directory that lost entries once, as on local disk.
//!
//! "No such file" from the server is not taken for absence on its own word: sftp-server's
//! `errno_to_portable` maps ENOENT, ENOTDIR, ELOOP and EBADF all to SSH2_FX_NO_SUCH_FILE, so a shard
//! directory replaced by a file, or a link loop, would look like a missing segment. Before a read
//! reports [`StorageError::NotFound`], `confirm_absent` (in `storage/mod.rs`) looks at the path and
//! its ancestors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use openssh_sftp_client::Error as SftpError;
use openssh_sftp_client::error::SftpErrorKind;
use openssh_sftp_client::file::{File, TokioCompatFile};
use openssh_sftp_client::{Sftp, SftpOptions};
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use super::settings::seconds;
use super::{
    DirEntryInfo, Housekeeping, ListResult, ListStep, NetworkRead, ObjectMeta, ObjectReader, ObjectWriter, PathKind,
    PathProbe, PutOptions, Storage, StorageError, bounded_each, confirm_absent, is_stale_temp, is_temp_older_than,
    listing_steps, may_remove_dir, parent_dir_key, parent_dirs, validate_key,
};
use crate::fs::{is_temp_name, temp_name};
use serde::Deserialize;

/// The `[ssh]` table, resolved. Anything unset is left to ssh itself: the user's `~/.ssh/config`,
/// agent, keys and `known_hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSettings {
    /// `identity_file`: the private key to log in with (absolute), and no other.
    pub identity_file: Option<PathBuf>,
    /// `known_hosts_file`: where the server's host key is recorded (absolute).
    pub known_hosts_file: Option<PathBuf>,
    /// `port`, when the URL names none.
    pub port: Option<u16>,
    /// `connect_timeout_secs`: ssh's `ConnectTimeout`.
    pub connect_timeout: Duration,
    /// `keepalive_secs`: how often ssh checks that the server is still there.
    pub keepalive: Duration,
    /// Accept a server without the fsync@openssh.com extension (no durability guarantee).
    pub allow_no_fsync: bool,
}

impl Default for SshSettings {
    fn default() -> Self {
        SshSettings {
            identity_file: None,
            known_hosts_file: None,
            port: None,
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            allow_no_fsync: false,
        }
    }
}

/// The `[ssh]` table as written in the configuration file; [`SshSettings::from_table`] checks it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SshTable {
    identity_file: Option<PathBuf>,
    known_hosts_file: Option<PathBuf>,
    port: Option<u16>,
    connect_timeout_secs: Option<u64>,
    keepalive_secs: Option<u64>,
    allow_no_fsync: Option<bool>,
}

impl SshSettings {
    /// Resolves the `[ssh]` table with its defaults (an absent table is an empty one); the error
    /// names the key at fault.
    pub(crate) fn from_table(file: SshTable) -> Result<Self, String> {
        let defaults = SshSettings::default();
        for (name, path) in [("identity_file", &file.identity_file), ("known_hosts_file", &file.known_hosts_file)] {
            if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(format!("{name} must be an absolute path"));
            }
        }
        Ok(SshSettings {
            identity_file: file.identity_file,
            known_hosts_file: file.known_hosts_file,
            port: file.port,
            connect_timeout: seconds(file.connect_timeout_secs, "connect_timeout_secs", defaults.connect_timeout)?,
            keepalive: seconds(file.keepalive_secs, "keepalive_secs", defaults.keepalive)?,
            allow_no_fsync: file.allow_no_fsync.unwrap_or(false),
        })
    }
}

/// Connects on first use, inside the command's deadline loop, and again after the connection broke:
/// an unreachable server or a dropped connection is retried like any transient failure.
pub struct SshStorage {
    user: Option<String>,
    host: String,
    port: Option<u16>,
    root: PathBuf,
    config: SshSettings,
    remote: String,
    session: tokio::sync::Mutex<Option<Arc<Connection>>>,
    pending_temps: PendingTemps,
}

/// One connection: the ssh child and the SFTP channel over it.
struct Connection {
    sftp: Sftp,
    /// Set when the channel failed; the next operation connects anew.
    broken: Arc<std::sync::atomic::AtomicBool>,
    /// The ssh process; kept so that it is killed when we are done (kill_on_drop).
    _child: Mutex<Child>,
    /// What ssh printed on stderr, to explain a connection that broke.
    ssh_stderr: Arc<Mutex<String>>,
    /// `ssh://user@host:port` for messages.
    remote: String,
    root: PathBuf,
    allow_no_fsync: bool,
}

impl SshStorage {
    /// Prepares the repository; nothing is sent until the first operation.
    pub fn new(user: Option<&str>, host: &str, url_port: Option<u16>, root: &Path, config: &SshSettings) -> Self {
        let port = url_port.or(config.port);
        let remote = format!(
            "ssh://{}{host}{}",
            user.map(|u| format!("{u}@")).unwrap_or_default(),
            port.map(|p| format!(":{p}")).unwrap_or_default()
        );
        SshStorage {
            user: user.map(str::to_owned),
            host: host.to_owned(),
            port,
            root: root.to_owned(),
            config: config.clone(),
            remote,
            session: tokio::sync::Mutex::new(None),
            pending_temps: PendingTemps::default(),
        }
    }

    /// The live connection, made (again) when there is none or the last one broke.
    async fn session(&self) -> Result<Arc<Connection>, StorageError> {
        let mut current = self.session.lock().await;
        if let Some(session) = current.as_ref()
            && !session.broken.load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(Arc::clone(session));
        }
        *current = None;
        let session = Arc::new(self.connect().await?);
        *current = Some(Arc::clone(&session));
        Ok(session)
    }

    async fn connect(&self) -> Result<Connection, StorageError> {
        let (user, host, port, config, remote) =
            (self.user.as_deref(), self.host.as_str(), self.port, &self.config, self.remote.clone());
        let mut command = Command::new("ssh");
        command
            .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ControlPath=none"])
            .args(["-o", "LogLevel=ERROR", "-o", "ServerAliveCountMax=3"])
            .arg("-o")
            .arg(format!("ConnectTimeout={}", config.connect_timeout.as_secs()))
            .arg("-o")
            .arg(format!("ServerAliveInterval={}", config.keepalive.as_secs()));
        if let Some(known_hosts) = &config.known_hosts_file {
            command.arg("-o").arg(format!("UserKnownHostsFile={}", known_hosts.display()));
        }
        if let Some(identity) = &config.identity_file {
            command.arg("-i").arg(identity).args(["-o", "IdentitiesOnly=yes"]);
        }
        if let Some(port) = port {
            command.arg("-p").arg(port.to_string());
        }
        if let Some(user) = user {
            command.arg("-l").arg(user);
        }
        // "--" keeps a host name from being read as an option.
        command.args(["-s", "--", host, "sftp"]);
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = command.spawn().map_err(|e| StorageError::Other {
            location: remote.clone(),
            message: format!("cannot run ssh: {e} (install the OpenSSH client)"),
            retryable: false,
        })?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let ssh_stderr = Arc::new(Mutex::new(String::new()));
        let collected = Arc::clone(&ssh_stderr);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            while let Ok(n) = stderr.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let mut text = collected.lock().unwrap_or_else(|p| p.into_inner());
                if text.len() < 16 * 1024 {
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        match Sftp::new(stdin, stdout, SftpOptions::default()).await {
            Ok(sftp) => Ok(Connection {
                sftp,
                broken: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                _child: Mutex::new(child),
                ssh_stderr,
                remote,
                root: self.root.clone(),
                allow_no_fsync: config.allow_no_fsync,
            }),
            Err(_) => {
                // ssh exited: its own words say why (host key, authentication, unreachable).
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), child.wait()).await;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                let said = ssh_stderr.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Err(connection_error(&remote, host, port, &said))
            }
        }
    }
}

/// `ssh://user@host:port/root/key`, for messages.
fn ssh_location(remote: &str, root: &Path, key: &str) -> String {
    format!("{remote}{}", root.join(key).display())
}

/// Temporary files written and not yet removed. An attempt cut off by a broken connection cannot
/// remove its own, so [`SshStorage::cleanup`] removes what is left over a new connection.
#[derive(Clone, Default)]
struct PendingTemps(Arc<Mutex<std::collections::HashSet<PathBuf>>>);

impl PendingTemps {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<PathBuf>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn register(&self, path: &Path) {
        self.set().insert(path.to_owned());
    }

    fn all(&self) -> Vec<PathBuf> {
        self.set().iter().cloned().collect()
    }

    /// Removes `path` over `session`. It stays registered unless it is gone for sure.
    async fn remove(&self, session: &Connection, key: &str, path: &Path) {
        let gone = match session.sftp.fs().remove_file(path).await {
            Ok(()) => true,
            Err(e) => session.classify(key, "remove temporary file", e).is_not_found(),
        };
        if gone {
            self.set().remove(path);
        }
    }
}

/// Explains why ssh could not set up the connection, with what to do about it, in one line.
fn connection_error(remote: &str, host: &str, port: Option<u16>, said: &str) -> StorageError {
    // ssh's banners ('@@@@') and blank lines carry nothing an operator needs here.
    let lines: Vec<&str> = said.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('@')).collect();
    let said_line = lines.join("; ");
    let host_label = match port {
        Some(port) => format!("[{host}]:{port}"),
        None => host.to_owned(),
    };
    let (message, retryable) = if said.contains("HAS CHANGED") || said.contains("has changed") {
        let fingerprint = lines.iter().find(|l| l.starts_with("SHA256:")).map_or("", |l| l.trim_end_matches('.'));
        let offending = lines.iter().find(|l| l.starts_with("Offending")).copied().unwrap_or("");
        (
            format!(
                "host key verification failed: the server's host key has CHANGED since it was recorded (a \
                 reinstalled server, or a man-in-the-middle); if the change is expected, check the new \
                 fingerprint {fingerprint} and replace the old key ({offending}; ssh-keygen -R \"{host_label}\")"
            ),
            false,
        )
    } else if said.contains("Host key verification failed") || said.contains("host key is known") {
        let keyscan = match port {
            Some(port) => format!("ssh-keyscan -p {port} {host}"),
            None => format!("ssh-keyscan {host}"),
        };
        (
            format!(
                "host key verification failed: the server's host key is not known ({said_line}); check its \
                 fingerprint, then add it to known_hosts (e.g. {keyscan} >> ~/.ssh/known_hosts, or the file named \
                 by known_hosts_file)"
            ),
            false,
        )
    } else if said.contains("Permission denied") || said.contains("Too many authentication failures") {
        (
            format!(
                "authentication failed ({said_line}); check identity_file or the agent, and the server's \
                 authorized_keys for this user"
            ),
            false,
        )
    } else if said.contains("subsystem request failed") {
        (format!("the server offers no sftp subsystem ({said_line})"), false)
    } else {
        // Refused, unreachable, timed out: the server may come back within the deadline.
        (format!("cannot connect: {}", if said_line.is_empty() { "ssh exited" } else { &said_line }), true)
    };
    StorageError::Other { location: remote.to_owned(), message, retryable }
}

impl Connection {
    fn path_of(&self, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(key).map_err(|reason| StorageError::InvalidKey { location: self.location(key), reason })?;
        Ok(self.root.join(key))
    }

    fn location(&self, key: &str) -> String {
        ssh_location(&self.remote, &self.root, key)
    }

    /// Maps an SFTP failure: only "no such file" is absence; a broken channel is worth retrying.
    fn classify(&self, key: &str, operation: &'static str, error: SftpError) -> StorageError {
        let location = self.location(key);
        match error {
            SftpError::SftpError(SftpErrorKind::NoSuchFile, _) => StorageError::NotFound { location },
            SftpError::SftpError(kind, message) => {
                StorageError::Other { location, message: format!("{operation}: {kind:?}: {message}"), retryable: false }
            }
            SftpError::UnsupportedExtension(extension) => StorageError::Other {
                location,
                message: format!("{operation}: the server lacks the {extension}@openssh.com extension"),
                retryable: false,
            },
            other => {
                self.broken.store(true, std::sync::atomic::Ordering::Relaxed);
                let said = self.ssh_stderr.lock().unwrap_or_else(|p| p.into_inner()).trim().replace('\n', "; ");
                let said = if said.is_empty() { String::new() } else { format!(" (ssh: {said})") };
                StorageError::Other {
                    location,
                    message: format!("{operation}: the connection to the server broke: {other}{said}"),
                    retryable: true,
                }
            }
        }
    }

    async fn exists(&self, key: &str, path: &Path) -> Result<bool, StorageError> {
        match self.sftp.fs().metadata(path).await {
            Ok(_) => Ok(true),
            Err(e) => match self.classify(key, "stat", e) {
                StorageError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Creates `dir` and its missing parents below the root, and notes in `gained` each directory
    /// that gained an entry, for the caller to fsync once the file it creates is in `dir`.
    async fn create_dirs(&self, key: &str, dir: &Path, gained: &mut Vec<PathBuf>) -> Result<(), StorageError> {
        let relative = dir.strip_prefix(&self.root).unwrap_or(dir);
        let mut current = self.root.clone();
        for component in relative.components() {
            current.push(component);
            if self.exists(key, &current).await? {
                continue;
            }
            match self.sftp.fs().create_dir(&current).await {
                Ok(()) => gained.push(current.parent().unwrap_or(&self.root).to_owned()),
                // A racing writer may have created it; only a directory that is still missing is an error.
                Err(e) if !self.exists(key, &current).await? => return Err(self.classify(key, "create directory", e)),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Creates the temporary file `temp_path` in `dir`, and first `dir` and its missing parents where
    /// they are missing (which saves the lookups when they exist, as they mostly do). Returns the file
    /// and the directories that gained an entry, to be fsynced by the caller. An expiry removes the
    /// directories its deletes emptied, so an empty directory may vanish before the file is in it:
    /// the directories are made again (up to a bound); the fsyncs wait until the file is there, which
    /// keeps the window between a directory's creation and the file's one request wide. A pass that
    /// created nothing cannot help: what is in the way is reported.
    async fn create_temp(&self, key: &str, dir: &Path, temp_path: &Path) -> Result<(File, Vec<PathBuf>), StorageError> {
        const ATTEMPTS: usize = 50;
        let (mut gained, mut attempt, mut last_pass_created) = (Vec::new(), 1, true);
        loop {
            let error = match self.sftp.options().write(true).create_new(true).open(temp_path).await {
                Ok(file) => return Ok((file, gained)),
                Err(e) => self.classify(key, "create temporary file", e),
            };
            if !error.is_not_found() {
                return Err(error);
            }
            if attempt >= ATTEMPTS || !last_pass_created {
                // "No such file" here may be a file where the directory belongs: say so.
                return Err(self.absent_or_in_the_way(dir, PathKind::Directory, error).await);
            }
            attempt += 1;
            let before = gained.len();
            self.create_dirs(key, dir, &mut gained).await?;
            last_pass_created = gained.len() > before;
        }
    }

    /// fsyncs the directory `dir` on the server (see the module comment).
    async fn fsync_dir(&self, key: &str, dir: &Path) -> Result<(), StorageError> {
        self.fsync_path(key, dir, ["open its directory, to fsync it", "fsync its directory", "close its directory"])
            .await
    }

    /// fsyncs the existing object at `path` and every directory from its own up to the root: the push
    /// that stored it may have died before any of them was durable.
    async fn fsync_existing(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        self.fsync_path(key, path, ["open the archived copy, to fsync it", "fsync", "close"]).await?;
        for dir in path.ancestors().skip(1).take_while(|dir| dir.starts_with(&self.root)) {
            self.fsync_dir(key, dir).await?;
        }
        Ok(())
    }

    /// Opens `path` (a file or a directory) read-only and fsyncs it through `fsync@openssh.com`,
    /// unless the server has no fsync and `allow_no_fsync` accepted that; `operations` name the open,
    /// fsync and close in errors.
    async fn fsync_path(&self, key: &str, path: &Path, operations: [&'static str; 3]) -> Result<(), StorageError> {
        self.require_fsync(key)?;
        if !self.sftp.support_fsync() {
            return Ok(());
        }
        let [open, fsync, close] = operations;
        let mut handle = self.sftp.options().read(true).open(path).await.map_err(|e| self.classify(key, open, e))?;
        let synced = handle.sync_all().await.map_err(|e| self.classify(key, fsync, e));
        let closed = handle.close().await.map_err(|e| self.classify(key, close, e));
        synced.and(closed)
    }

    /// Lists keys in key order by walking directories in sorted order, like the local backend; hidden
    /// (temporary) names are skipped. One directory's entries are held at a time.
    fn walk<'a>(
        &'a self,
        dir_key: String,
        prefix: &'a str,
        start_after: Option<&'a str>,
        limit: usize,
        found: &'a mut Vec<ObjectMeta>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StorageError>> + Send + 'a>> {
        Box::pin(async move {
            let dir = if dir_key.is_empty() { self.root.clone() } else { self.root.join(&dir_key) };
            let entries = match self.sftp.fs().open_dir(&dir).await {
                Ok(handle) => read_dir_entries(handle).await.map_err(|e| self.classify(&dir_key, "list", e))?,
                // A directory that is not there holds no keys; one that only looks absent (a file or a
                // link loop in its place) is an error, not an empty listing.
                Err(e) => {
                    match self.absent_or_in_the_way(&dir, PathKind::Directory, self.classify(&dir_key, "list", e)).await
                    {
                        StorageError::NotFound { .. } => return Ok(()),
                        other => return Err(other),
                    }
                }
            };
            for step in listing_steps(&dir_key, entries, prefix, start_after) {
                if found.len() >= limit {
                    break;
                }
                match step {
                    ListStep::Descend(key) => self.walk(key, prefix, start_after, limit, found).await?,
                    ListStep::Emit(meta) => found.push(meta),
                }
            }
            Ok(())
        })
    }

    /// Removes temporary files that a killed process left in `dir`, once they are as old as the local
    /// backend's limit: no live write leaves its file untouched that long. Best effort.
    async fn remove_stale_temp_files(&self, dir: &Path) {
        let Ok(handle) = self.sftp.fs().open_dir(dir).await else { return };
        use futures_util::StreamExt;
        let stream = handle.read_dir();
        futures_util::pin_mut!(stream);
        let now = SystemTime::now();
        let mut stale = Vec::new();
        while let Some(Ok(entry)) = stream.next().await {
            let name = entry.filename().to_string_lossy().into_owned();
            let modified = entry.metadata().modified().map(|m| m.as_system_time());
            if is_stale_temp(&name, modified, now) {
                stale.push(dir.join(name));
            }
        }
        for path in stale {
            let _ = self.sftp.fs().remove_file(&path).await;
        }
    }

    /// Removes the file at `path`; one already gone counts as removed (another expiry got there first).
    async fn remove_if_present(&self, key: &str, path: &Path) -> Result<(), StorageError> {
        match self.sftp.fs().remove_file(path).await {
            Ok(()) => Ok(()),
            Err(e) => match self.classify(key, "delete", e) {
                StorageError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// After a batch of deletes, as the local backend does: removes the directories in `dirs`
    /// (relative to the root, each before its ancestors) that the deletes emptied, and ancestors
    /// emptied in turn, as far as [`may_remove_dir`] allows; then fsyncs once each directory that
    /// lost entries, also where a concurrent run removed them, since our caller goes on believing
    /// them durable. sftp-server reports a directory that is not empty as a plain failure: such a
    /// directory (a writer just put something there) stays. Nothing is removed recursively.
    async fn prune_and_sync(&self, dirs: &[String]) -> Result<(), StorageError> {
        let mut to_sync: std::collections::BTreeSet<String> = dirs.iter().cloned().collect();
        for dir in dirs {
            let mut current = dir.as_str();
            while may_remove_dir(current) {
                match self.sftp.fs().remove_dir(self.root.join(current)).await {
                    Ok(()) => {}
                    Err(SftpError::SftpError(SftpErrorKind::Failure, _)) => break,
                    Err(e) => match self.classify(current, "remove emptied directory", e) {
                        // Gone already counts as removed: a concurrent run emptied it first.
                        StorageError::NotFound { .. } => {}
                        other => return Err(other),
                    },
                }
                to_sync.remove(current);
                current = parent_dir_key(current);
                to_sync.insert(current.to_owned());
            }
        }
        for dir in &to_sync {
            let path = if dir.is_empty() { self.root.clone() } else { self.root.join(dir) };
            match self.fsync_dir(dir, &path).await {
                Ok(()) | Err(StorageError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes the temporary files in `dir` untouched for more than `older_than`, counting them in
    /// `found`, and adds its subdirectories to `pending`. sftp-server describes entries as `lstat`
    /// does, so symbolic links are neither followed nor removed. A directory that vanished meanwhile
    /// (an expiry removed it) holds nothing; the root must be there.
    async fn sweep_dir(
        &self,
        dir: &Path,
        older_than: Duration,
        now: SystemTime,
        pending: &mut Vec<PathBuf>,
        found: &mut Housekeeping,
    ) -> Result<(), StorageError> {
        use futures_util::StreamExt;
        let key = dir.strip_prefix(&self.root).unwrap_or(dir).to_string_lossy().into_owned();
        let handle = match self.sftp.fs().open_dir(dir).await {
            Ok(handle) => handle,
            Err(e) => {
                return match self.classify(&key, "open directory", e) {
                    StorageError::NotFound { .. } if dir != self.root => Ok(()),
                    other => Err(other),
                };
            }
        };
        let mut stale = Vec::new();
        let stream = handle.read_dir();
        futures_util::pin_mut!(stream);
        while let Some(entry) = stream.next().await {
            let entry = entry.map_err(|e| self.classify(&key, "read directory", e))?;
            let name = entry.filename().to_string_lossy().into_owned();
            let meta = entry.metadata();
            let Some(file_type) = meta.file_type() else { continue };
            if file_type.is_dir() && name != "." && name != ".." {
                pending.push(dir.join(&name));
            } else if file_type.is_file()
                && is_temp_older_than(&name, meta.modified().map(|m| m.as_system_time()), now, older_than)
            {
                stale.push((dir.join(&name), meta.len().unwrap_or(0)));
            }
        }
        for (path, size) in stale {
            let key = path.strip_prefix(&self.root).unwrap_or(&path).to_string_lossy().into_owned();
            match self.sftp.fs().remove_file(&path).await {
                Ok(()) => {
                    found.temp_files += 1;
                    found.temp_bytes += size;
                }
                Err(e) => match self.classify(&key, "remove temporary file", e) {
                    StorageError::NotFound { .. } => {}
                    other => return Err(other),
                },
            }
        }
        Ok(())
    }

    /// Refuses to write where nothing can be made durable, unless `allow_no_fsync` accepts the risk.
    fn require_fsync(&self, key: &str) -> Result<(), StorageError> {
        if self.allow_no_fsync || self.sftp.support_fsync() {
            return Ok(());
        }
        Err(StorageError::Other {
            location: self.location(key),
            message: "the SFTP server lacks the fsync@openssh.com extension, so writes cannot be made \
                      durable; use OpenSSH's sftp-server, or set allow_no_fsync = true in [ssh] to accept the risk"
                .into(),
            retryable: false,
        })
    }

    /// What a read that got "no such file" for `path` may report: absence only once it is confirmed.
    async fn absent_or_in_the_way(&self, path: &Path, wanted: PathKind, error: StorageError) -> StorageError {
        match error {
            StorageError::NotFound { location } => confirm_absent(self, &self.root, path, wanted, location).await,
            other => other,
        }
    }
}

#[async_trait]
impl PathProbe for Connection {
    async fn probe(&self, path: &Path, follow_links: bool) -> Result<PathKind, StorageError> {
        let key = path.strip_prefix(&self.root).unwrap_or(path).to_string_lossy().into_owned();
        let meta = if follow_links {
            self.sftp.fs().metadata(path).await
        } else {
            self.sftp.fs().symlink_metadata(path).await
        };
        match meta {
            Ok(meta) => Ok(match meta.file_type() {
                Some(t) if t.is_dir() => PathKind::Directory,
                Some(t) if t.is_file() => PathKind::File,
                Some(t) if t.is_symlink() => PathKind::Symlink,
                _ => PathKind::Special,
            }),
            Err(e) => match self.classify(&key, if follow_links { "stat" } else { "lstat" }, e) {
                StorageError::NotFound { .. } => Ok(PathKind::Missing),
                other => Err(other),
            },
        }
    }
}

#[async_trait]
impl Storage for SshStorage {
    fn location(&self, key: &str) -> String {
        ssh_location(&self.remote, &self.root, key)
    }

    async fn create(&self, key: &str, _options: PutOptions) -> Result<Box<dyn ObjectWriter>, StorageError> {
        let inner = &self.session().await?;
        inner.require_fsync(key)?;
        let final_path = inner.path_of(key)?;
        let dir = final_path.parent().expect("a key has a parent").to_owned();
        let file_name = final_path.file_name().expect("a key has a file name").to_string_lossy().into_owned();
        let temp_path = dir.join(temp_name(&file_name));
        let (file, mut gained) = inner.create_temp(key, &dir, &temp_path).await?;
        self.pending_temps.register(&temp_path);
        gained.sort();
        gained.dedup();
        for parent in &gained {
            if let Err(e) = inner.fsync_dir(key, parent).await {
                let _ = file.close().await;
                self.pending_temps.remove(inner, key, &temp_path).await;
                return Err(e);
            }
        }
        Ok(Box::new(SshWriter {
            pending_temps: self.pending_temps.clone(),
            inner: Arc::clone(inner),
            key: key.to_owned(),
            file: Some(file),
            temp_path,
            final_path,
            dir,
        }))
    }

    async fn get(&self, key: &str) -> Result<ObjectReader, StorageError> {
        let inner = self.session().await?;
        let path = inner.path_of(key)?;
        let file = match inner.sftp.open(&path).await {
            Ok(file) => file,
            Err(e) => {
                return Err(inner.absent_or_in_the_way(&path, PathKind::File, inner.classify(key, "open", e)).await);
            }
        };
        Ok(Box::new(NetworkRead::new(TokioCompatFile::new(file), Some(Arc::clone(&inner.broken)))))
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError> {
        let inner = self.session().await?;
        let path = inner.path_of(key)?;
        let meta = match inner.sftp.fs().metadata(&path).await {
            Ok(meta) => meta,
            Err(e) => {
                return Err(inner.absent_or_in_the_way(&path, PathKind::File, inner.classify(key, "stat", e)).await);
            }
        };
        Ok(ObjectMeta {
            key: key.to_owned(),
            size: meta.len().unwrap_or(0),
            attributes: BTreeMap::new(),
            modified: meta.modified().map(|m| m.as_system_time()),
        })
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> ListResult {
        let base = prefix.rfind('/').map_or("", |slash| &prefix[..slash]);
        let mut found = Vec::new();
        self.session().await?.walk(base.to_owned(), prefix, start_after, limit, &mut found).await?;
        Ok(found)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        let inner = self.session().await?;
        let path = inner.path_of(key)?;
        // Not made durable: a removal that a crash undoes leaves an object that is deleted again later.
        inner.sftp.fs().remove_file(&path).await.map_err(|e| inner.classify(key, "delete", e))
    }

    async fn delete_many(&self, keys: &[String]) -> Result<u64, StorageError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let inner = self.session().await?;
        let paths = keys.iter().map(|key| inner.path_of(key)).collect::<Result<Vec<_>, _>>()?;
        // Requests on one SFTP channel are pipelined: several in flight hide the round trips.
        bounded_each(&self.location(""), keys.iter().cloned().zip(paths), |(key, path)| {
            let inner = Arc::clone(&inner);
            async move { inner.remove_if_present(&key, &path).await }
        })
        .await?;
        inner.prune_and_sync(&parent_dirs(keys)).await?;
        Ok(keys.len() as u64)
    }

    async fn remove_stale(&self, older_than: Duration) -> Result<Housekeeping, StorageError> {
        let inner = self.session().await?;
        let now = SystemTime::now();
        let mut found = Housekeeping::default();
        // Directories still to visit: never the whole tree, however many objects it holds.
        let mut pending = vec![inner.root.clone()];
        while let Some(dir) = pending.pop() {
            inner.sweep_dir(&dir, older_than, now, &mut pending, &mut found).await?;
        }
        Ok(found)
    }

    async fn make_durable(&self, key: &str) -> Result<(), StorageError> {
        let inner = self.session().await?;
        let path = inner.path_of(key)?;
        inner.fsync_existing(key, &path).await
    }

    async fn cleanup(&self) -> Result<(), StorageError> {
        let pending = self.pending_temps.all();
        if pending.is_empty() {
            return Ok(());
        }
        let session = self.session().await?;
        for temp in pending {
            self.pending_temps.remove(&session, "", &temp).await;
        }
        Ok(())
    }

    async fn remove_incomplete(&self, prefix: &str) -> Result<(), StorageError> {
        let inner = self.session().await?;
        let dir = inner.path_of(prefix.trim_end_matches('/'))?;
        let handle = match inner.sftp.fs().open_dir(&dir).await {
            Ok(handle) => handle,
            Err(e) => {
                let e = inner.classify(prefix, "open directory", e);
                return if e.is_not_found() { Ok(()) } else { Err(e) };
            }
        };
        let entries = read_dir_entries(handle).await.map_err(|e| inner.classify(prefix, "read directory", e))?;
        for entry in entries.iter().filter(|entry| is_temp_name(&entry.name)) {
            let path = dir.join(&entry.name);
            inner.sftp.fs().remove_file(&path).await.map_err(|e| inner.classify(prefix, "remove temporary file", e))?;
        }
        let _ = inner.sftp.fs().remove_dir(&dir).await;
        Ok(())
    }

    async fn check_root(&self) -> Result<(), StorageError> {
        let inner = &self.session().await?;
        match inner.sftp.fs().metadata(&inner.root).await {
            Ok(meta) if meta.file_type().is_some_and(|t| t.is_dir()) => Ok(()),
            Ok(_) => Err(StorageError::Other {
                location: inner.location(""),
                message: "the repository path is not a directory".into(),
                retryable: false,
            }),
            Err(e) => Err(match inner.classify("", "stat", e) {
                StorageError::NotFound { location } => StorageError::Other {
                    location,
                    message: "the repository directory does not exist on the server (create it, writable by \
                              the login user)"
                        .into(),
                    retryable: false,
                },
                other => other,
            }),
        }
    }
}

async fn read_dir_entries(handle: openssh_sftp_client::fs::Dir) -> Result<Vec<DirEntryInfo>, SftpError> {
    use futures_util::StreamExt;
    let mut entries = Vec::new();
    let stream = handle.read_dir();
    futures_util::pin_mut!(stream);
    while let Some(entry) = stream.next().await {
        let entry = entry?;
        let name = entry.filename().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        let meta = entry.metadata();
        let is_dir = meta.file_type().is_some_and(|t| t.is_dir());
        let modified = meta.modified().map(|m| m.as_system_time());
        entries.push(DirEntryInfo { name, is_dir, size: meta.len().unwrap_or(0), modified });
    }
    Ok(entries)
}

struct SshWriter {
    pending_temps: PendingTemps,
    inner: Arc<Connection>,
    key: String,
    file: Option<File>,
    temp_path: PathBuf,
    final_path: PathBuf,
    dir: PathBuf,
}

impl SshWriter {
    /// Removes the temporary file; one that cannot be removed now stays registered for `cleanup`.
    async fn remove_temp(&self) {
        self.pending_temps.remove(&self.inner, &self.key, &self.temp_path).await;
    }

    async fn publish(&mut self) -> Result<(), StorageError> {
        let inner = Arc::clone(&self.inner);
        let mut file = self.file.take().expect("commit once");
        if inner.sftp.support_fsync() {
            file.sync_all().await.map_err(|e| inner.classify(&self.key, "fsync", e))?;
        }
        if let Err(e) = inner.sftp.fs().hard_link(&self.temp_path, &self.final_path).await {
            let _ = file.close().await;
            // OpenSSH reports an existing name as a plain "failure": look before calling it a conflict.
            return Err(if inner.exists(&self.key, &self.final_path).await? {
                StorageError::AlreadyExists { location: inner.location(&self.key) }
            } else {
                inner.classify(&self.key, "publish (hardlink@openssh.com)", e)
            });
        }
        file.close().await.map_err(|e| inner.classify(&self.key, "close", e))?;
        // The new name is durable once its directory is.
        inner.fsync_dir(&self.key, &self.dir).await?;
        self.remove_temp().await;
        inner.remove_stale_temp_files(&self.dir).await;
        Ok(())
    }
}

#[async_trait]
impl ObjectWriter for SshWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        let file = self.file.as_mut().expect("writer used after commit");
        file.write_all(&chunk).await.map_err(|e| self.inner.classify(&self.key, "write", e))
    }

    async fn commit(mut self: Box<Self>) -> Result<(), StorageError> {
        let result = self.publish().await;
        if result.is_err() {
            self.remove_temp().await;
        }
        result
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        if let Some(file) = self.file.take() {
            let _ = file.close().await;
        }
        self.remove_temp().await;
        Ok(())
    }
}
