//! A real SSH server for tests: OpenSSH's `sshd` (Debian's `openssh-server`) on 127.0.0.1 and a free
//! port, run as the server user (`postgres` when we are root) with its own host key, so that it needs
//! no root, accepts logins for that user only, and serves SFTP with `/usr/lib/openssh/sftp-server`.
//!
//! The server runs on this machine, so the remote repository is a local directory
//! ([`SshServer::repo_dir`]) that tests can inspect and damage directly.
//!
//! Everything lives in one scratch directory: the server's configuration, host key, pid file and log,
//! the client's key pair (and a second, unauthorised one), `known_hosts` files (right, changed, empty)
//! and a home directory for the client, so that nobody's real `~/.ssh` is read or written.
//!
//! sshd forks one process per connection, in a session of its own, and that one starts sftp-server:
//! killing the listener alone would leave running transfers alive. [`SshServer::kill`],
//! [`SshServer::freeze`] and [`SshServer::thaw`] therefore act on the listener and every process
//! below it, found through /proc; [`SshServer::kill_sessions`] cuts the connections and keeps the
//! listener.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::s3::free_port;
use crate::{Scratch, as_server_user, chown_to_server_user, server_user};

pub const SSHD: &str = "/usr/sbin/sshd";
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// How long sshd gets to listen after it was started.
const START_LIMIT: Duration = Duration::from_secs(20);

pub struct SshServer {
    child: Option<Child>,
    port: u16,
    /// Options for sftp-server in the `Subsystem` line.
    sftp_args: String,
    /// Configuration, keys, known_hosts files, log, the client's home and the repository.
    dir: Scratch,
}

impl SshServer {
    /// Generates keys and starts a server on a free port, with an empty repository directory.
    pub fn start() -> SshServer {
        SshServer::start_with_sftp_args(&[])
    }

    /// [`start`](Self::start) with options for sftp-server, such as `-P fsync,hardlink` (refuse those
    /// requests, as a server without the extensions would: OpenSSH still advertises them).
    pub fn start_with_sftp_args(sftp_args: &[&str]) -> SshServer {
        assert!(
            Path::new(SSHD).exists() && Path::new(SFTP_SERVER).exists(),
            "{SSHD} or {SFTP_SERVER} is missing: apt-get install -y openssh-server (scripts/install-deps.sh)"
        );
        let dir = Scratch::new("sshd");
        let mut server = SshServer { child: None, port: 0, sftp_args: sftp_args.join(" "), dir };
        for key in [HOST_KEY, OTHER_HOST_KEY, CLIENT_KEY, WRONG_CLIENT_KEY] {
            server.keygen(key);
        }
        let authorized = fs::read_to_string(server.path(&format!("{CLIENT_KEY}.pub"))).unwrap();
        server.write("authorized_keys", &authorized, 0o600);
        server.dir.mkdir("home");
        server.dir.mkdir("repo");
        server.write(EMPTY_KNOWN_HOSTS, "", 0o644);
        server.launch(free_port());
        server
    }

    /// Starts the server again after [`kill`](Self::kill), on the same port if it can be had within a
    /// few seconds, else on a new one (then the `known_hosts` files are rewritten and configurations
    /// written before must be written again: [`port`](Self::port) tells). Keeps keys and repository.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if self.try_launch(port).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("sshd could not listen on port {port} again; moving to another port");
        self.launch(free_port());
    }

    fn launch(&mut self, port: u16) {
        if let Err(log) = self.try_launch(port) {
            panic!("sshd did not listen on 127.0.0.1:{port}: {log}");
        }
    }

    /// Starts sshd on `port` and waits until it accepts connections; `Err(log)` if it exits first.
    fn try_launch(&mut self, port: u16) -> Result<(), String> {
        self.port = port;
        self.write_known_hosts();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {pid}\nAuthorizedKeysFile {authorized}\n\
             PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPermitRootLogin no\nAllowTcpForwarding no\nX11Forwarding no\nPrintMotd no\n\
             LogLevel VERBOSE\nSubsystem sftp {SFTP_SERVER} {sftp_args}\n",
            host_key = self.path(HOST_KEY).display(),
            pid = self.path("sshd.pid").display(),
            authorized = self.path("authorized_keys").display(),
            sftp_args = self.sftp_args,
        );
        self.write("sshd_config", &config, 0o644);
        let log = fs::OpenOptions::new().create(true).append(true).open(self.path("sshd.log")).unwrap();
        chown_to_server_user(&self.path("sshd.log"));
        let mut cmd = Command::new(SSHD);
        cmd.args(["-D", "-e", "-f"]).arg(self.path("sshd_config"));
        as_server_user(&mut cmd).env("HOME", self.client_home());
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {SSHD}: {e}"));
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Err(format!("sshd exited ({status}): {}", self.log()));
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if started.elapsed() > START_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("not listening after {} s: {}", START_LIMIT.as_secs(), self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Stops the server and every connection it serves at once (SIGKILL to all of them), as a crash of
    /// the machine would. Transfers under way break off; nothing on the server side cleans up.
    pub fn kill(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // Stopped processes cannot fork, so once the tree stops changing it is complete.
        let tree = self.stop_tree(child.id());
        for pid in &tree {
            signal(*pid, libc::SIGKILL);
        }
        let _ = child.wait();
        // The others are not our children: wait until they are gone (reaped by whoever adopted them).
        let started = Instant::now();
        while tree.iter().any(|pid| is_alive(*pid)) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Cuts every open connection (SIGKILL to each session's sshd and sftp-server processes) while the
    /// server keeps listening: a dropped connection, after which a new one succeeds. Returns how many
    /// processes it killed.
    pub fn kill_sessions(&self) -> usize {
        let Some(child) = &self.child else { return 0 };
        let listener = child.id();
        let tree = self.stop_tree(listener);
        let sessions: Vec<u32> = tree.iter().copied().filter(|pid| *pid != listener).collect();
        for pid in &sessions {
            signal(*pid, libc::SIGKILL);
        }
        signal(listener, libc::SIGCONT);
        let started = Instant::now();
        while sessions.iter().any(|pid| is_alive(*pid)) && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        sessions.len()
    }

    /// Makes the server stop answering, without closing anything: SIGSTOP to the listener and every
    /// connection (sshd and sftp-server processes). Connections made while frozen wait in the kernel's
    /// backlog and get no banner. [`thaw`](Self::thaw) undoes it; [`kill`](Self::kill) and drop work on
    /// a frozen server too.
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            self.stop_tree(child.id());
        }
    }

    /// Lets a frozen server run again (SIGCONT to the listener and every process below it).
    pub fn thaw(&self) {
        if let Some(child) = &self.child {
            for pid in tree_of(child.id()) {
                signal(pid, libc::SIGCONT);
            }
        }
    }

    /// SIGSTOPs `root` and everything below it, until no new process appears; returns them all.
    fn stop_tree(&self, root: u32) -> BTreeSet<u32> {
        let mut stopped = BTreeSet::new();
        for _ in 0..50 {
            let tree = tree_of(root);
            let new: Vec<u32> = tree.difference(&stopped).copied().collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                signal(pid, libc::SIGSTOP);
                stopped.insert(pid);
            }
            // Let a fork that was under way finish, so that its child shows up on the next pass.
            std::thread::sleep(Duration::from_millis(5));
        }
        stopped
    }

    /// The sftp-server processes serving connections right now (one per session).
    pub fn sftp_sessions(&self) -> Vec<u32> {
        let Some(child) = &self.child else { return Vec::new() };
        tree_of(child.id()).into_iter().filter(|pid| comm(*pid).as_deref() == Some("sftp-server")).collect()
    }

    /// The listener's process id while it runs: what a tracer attaches to (with `-f` it then sees every
    /// session and its sftp-server).
    pub fn listener_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether sshd is running (started and not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The user the server accepts: the server user's name (`postgres` as root), else ours.
    pub fn user(&self) -> String {
        let uid = server_user().map(|(uid, _)| uid).unwrap_or_else(|| {
            // SAFETY: getuid has no preconditions.
            unsafe { libc::getuid() }
        });
        let out = Command::new("id").args(["-un", &uid.to_string()]).output().expect("run id");
        assert!(out.status.success(), "id -un {uid}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The `ssh://` URL of `remote_path` (absolute) on this server.
    pub fn url(&self, remote_path: &Path) -> String {
        assert!(remote_path.is_absolute(), "{remote_path:?}: remote paths are absolute");
        format!("ssh://{}@127.0.0.1:{}{}", self.user(), self.port, remote_path.display())
    }

    /// The directory the repository lives in (empty at start, owned by the server user). The server
    /// is this machine, so the remote path and the local one are the same.
    pub fn repo_dir(&self) -> PathBuf {
        self.path("repo")
    }

    /// A home directory for ssh clients (`HOME`), in the scratch directory.
    pub fn client_home(&self) -> PathBuf {
        self.path("home")
    }

    /// The client's private key, authorised on the server.
    pub fn identity_file(&self) -> PathBuf {
        self.path(CLIENT_KEY)
    }

    /// A valid private key the server does not know.
    pub fn wrong_identity_file(&self) -> PathBuf {
        self.path(WRONG_CLIENT_KEY)
    }

    /// `known_hosts` with the server's real host key for `[127.0.0.1]:PORT`.
    pub fn known_hosts_file(&self) -> PathBuf {
        self.path(KNOWN_HOSTS)
    }

    /// `known_hosts` with another ed25519 key for `[127.0.0.1]:PORT`: the host key "changed".
    pub fn changed_known_hosts_file(&self) -> PathBuf {
        self.path(CHANGED_KNOWN_HOSTS)
    }

    /// An empty `known_hosts`: the host is unknown.
    pub fn empty_known_hosts_file(&self) -> PathBuf {
        self.path(EMPTY_KNOWN_HOSTS)
    }

    /// The `ssh-ed25519 AAAA...` part of the server's host key.
    pub fn host_key(&self) -> String {
        public_key(&self.path(&format!("{HOST_KEY}.pub")))
    }

    /// The text of a walship configuration for `remote_path` on this server, with the client's key and
    /// the right `known_hosts`; `top` adds top-level lines (`deadline_secs = 5`), `extra_ssh` lines to
    /// `[ssh]` (not `identity_file` or `known_hosts_file`: TOML refuses a key twice; choose them with
    /// [`config_text_with`](Self::config_text_with)).
    pub fn config_text(&self, remote_path: &Path, top: &str, extra_ssh: &str) -> String {
        self.config_text_with(remote_path, top, &self.identity_file(), &self.known_hosts_file(), extra_ssh)
    }

    /// [`config_text`](Self::config_text) with a chosen identity and `known_hosts` file.
    pub fn config_text_with(
        &self,
        remote_path: &Path,
        top: &str,
        identity_file: &Path,
        known_hosts_file: &Path,
        extra_ssh: &str,
    ) -> String {
        format!(
            "repo = \"{}\"\n{top}\n[ssh]\nidentity_file = \"{}\"\nknown_hosts_file = \"{}\"\n{extra_ssh}\n",
            self.url(remote_path),
            identity_file.display(),
            known_hosts_file.display(),
        )
    }

    /// What sshd logged (both runs, if restarted).
    pub fn log(&self) -> String {
        fs::read_to_string(self.path("sshd.log")).unwrap_or_default()
    }

    /// `ssh` client processes connecting to this server's port (left behind by a command, say).
    pub fn client_processes(&self) -> Vec<(u32, String)> {
        let port = self.port.to_string();
        all_processes()
            .into_keys()
            .filter(|pid| comm(*pid).as_deref() == Some("ssh"))
            .filter_map(|pid| {
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let args: Vec<String> =
                    cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                let ours = args.iter().any(|a| a == &port || a.ends_with(&format!("={port}")))
                    && args.iter().any(|a| a.contains("127.0.0.1"));
                ours.then(|| (pid, args.join(" ")))
            })
            .collect()
    }

    /// Kills `ssh` clients of this server that outlived their command (so that a failing test leaves
    /// none behind); returns what it found.
    pub fn kill_clients(&self) -> Vec<(u32, String)> {
        let clients = self.client_processes();
        for (pid, _) in &clients {
            signal(*pid, libc::SIGKILL);
        }
        clients
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str, mode: u32) {
        let path = self.path(name);
        fs::write(&path, text).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        chown_to_server_user(&path);
    }

    /// An ed25519 key pair without passphrase, `name` and `name.pub`, owned by the server user.
    fn keygen(&self, name: &str) {
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-t", "ed25519", "-N", "", "-C", &format!("walship-test-{name}"), "-f"]).arg(self.path(name));
        as_server_user(&mut cmd).env("HOME", self.client_home());
        let out = cmd.stdin(Stdio::null()).output().expect("run ssh-keygen");
        assert!(out.status.success(), "ssh-keygen {name}: {}", String::from_utf8_lossy(&out.stderr));
        fs::set_permissions(self.path(name), fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// The right and the changed `known_hosts` for the current port.
    fn write_known_hosts(&self) {
        let host = format!("[127.0.0.1]:{}", self.port);
        self.write(KNOWN_HOSTS, &format!("{host} {}\n", self.host_key()), 0o644);
        let other = public_key(&self.path(&format!("{OTHER_HOST_KEY}.pub")));
        self.write(CHANGED_KNOWN_HOSTS, &format!("{host} {other}\n"), 0o644);
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        self.kill();
        self.kill_clients();
    }
}

const HOST_KEY: &str = "ssh_host_ed25519_key";
const OTHER_HOST_KEY: &str = "other_host_ed25519_key";
const CLIENT_KEY: &str = "id_ed25519";
const WRONG_CLIENT_KEY: &str = "wrong_id_ed25519";
const KNOWN_HOSTS: &str = "known_hosts";
const CHANGED_KNOWN_HOSTS: &str = "known_hosts_changed";
const EMPTY_KNOWN_HOSTS: &str = "known_hosts_empty";

/// `ssh-ed25519 AAAA...` from a `.pub` file (its comment dropped).
fn public_key(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let fields: Vec<&str> = text.split_whitespace().take(2).collect();
    assert_eq!(fields.len(), 2, "{path:?}: not a public key: {text:?}");
    fields.join(" ")
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions; pid names one process, never a group.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Whether `pid` still runs (a zombie does not).
fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// The command name of `pid` (`/proc/PID/comm`).
fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim_end().to_owned())
}

/// Every process and its parent.
fn all_processes() -> BTreeMap<u32, u32> {
    let mut parents = BTreeMap::new();
    let Ok(entries) = fs::read_dir("/proc") else { return parents };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the last ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parents.insert(pid, ppid);
        }
    }
    parents
}

/// `root` and every live process below it.
fn tree_of(root: u32) -> BTreeSet<u32> {
    let parents = all_processes();
    let mut tree = BTreeSet::new();
    if !parents.contains_key(&root) {
        return tree;
    }
    tree.insert(root);
    // Bounded: each pass adds at least one process or stops.
    for _ in 0..parents.len() {
        let before = tree.len();
        for (pid, ppid) in &parents {
            if tree.contains(ppid) {
                tree.insert(*pid);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    tree
}
