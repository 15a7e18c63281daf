//! Throwaway PostgreSQL clusters for tests: initdb, start and stop, run SQL and pgbench, take base
//! backups, and set up restores from them.
//!
//! Each [`Cluster`] lives in its own [`Scratch`] directory (data directory, socket directory, server
//! log) and listens on a Unix socket only, so clusters never collide on ports and need no network.
//! Everything runs as the server user through the harness core. Dropping a cluster stops its server
//! with `pg_ctl stop -m immediate` before the directory is removed, so a panicking test leaves no
//! postgres process behind.
//!
//! The PostgreSQL binaries are taken from `$WALSHIP_PG_BIN`, else `/usr/lib/postgresql/15/bin`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::versions::PgInstall;
use crate::{Output, Scratch, as_server_user, bin, chown_to_server_user, isolate_environment, run};

/// Where the PostgreSQL binaries come from unless `$WALSHIP_PG_BIN` says otherwise.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Every cluster has its own socket directory, so they can all use the same port.
const PORT: u16 = 5432;

/// How long a start or a bounded wait may take before the test fails. Generous: a loaded 2-core CI
/// machine replaying WAL from the archive is slow, and a hang must still end in a clear failure.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(120);

const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Lines of the server log quoted in a failure message.
const LOG_TAIL_LINES: usize = 40;

/// The directory holding initdb, pg_ctl, psql, pgbench and pg_basebackup.
pub fn pg_bin_dir() -> PathBuf {
    let dir = std::env::var_os("WALSHIP_PG_BIN").map(PathBuf::from).unwrap_or_else(|| DEFAULT_PG_BIN.into());
    assert!(
        dir.join("initdb").is_file(),
        "no initdb in {dir:?}: install postgresql-15 (apt-get install -y postgresql-15) or set WALSHIP_PG_BIN"
    );
    dir
}

/// A PostgreSQL program of the default installation run as the server user, from `cwd`, with a
/// predictable environment.
pub fn pg_command(program: &str, cwd: &Path) -> Command {
    program_command(&pg_bin_dir().join(program), cwd)
}

/// The program at `path` run as [`pg_command`] runs one.
pub fn program_command(path: &Path, cwd: &Path) -> Command {
    let mut cmd = Command::new(path);
    clear_pg_env(&mut cmd);
    // The server runs archive_command and restore_command with its own environment: no walship or
    // AWS settings of whoever runs the tests may redirect them, and the AWS SDK must never ask the
    // EC2 instance metadata service (169.254.169.254) for a region or credentials.
    isolate_environment(&mut cmd);
    // English messages, so tests can look for them in the server log.
    cmd.env("LC_ALL", "C");
    // The server user may not be allowed into the test's own working directory.
    cmd.current_dir(cwd);
    as_server_user(&mut cmd);
    cmd
}

/// Removes libpq's settings of whoever runs the tests from `cmd`'s environment: PG* variables
/// (PGHOST, PGDATABASE, PGOPTIONS...) would redirect or alter our connections.
pub fn clear_pg_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Quotes a value for postgresql.conf.
pub fn conf_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Quotes a path for the shell that runs archive_command and restore_command, escaping `%` which
/// PostgreSQL would otherwise take for a placeholder.
fn command_path(path: &Path) -> String {
    let text = path.to_str().expect("UTF-8 path");
    format!("'{}'", text.replace('\'', r"'\''").replace('%', "%%"))
}

/// The archive_command that pushes into `repo` with our `wal-push`.
pub fn archive_command(repo: &Path) -> String {
    format!("{} --repo {} %p %f", command_path(&bin("wal-push")), command_path(repo))
}

/// The restore_command that fetches from `repo` with our `wal-fetch`.
pub fn restore_command(repo: &Path) -> String {
    format!("{} --repo {} %f %p", command_path(&bin("wal-fetch")), command_path(repo))
}

/// The archive_command that pushes with our `wal-push` into the repository (any kind, `s3://` included)
/// named by the configuration file `config`, which the server user must be able to read.
pub fn archive_command_with_config(config: &Path) -> String {
    format!("{} --config {} %p %f", command_path(&bin("wal-push")), command_path(config))
}

/// The restore_command that fetches with our `wal-fetch` from the repository named by the
/// configuration file `config`.
pub fn restore_command_with_config(config: &Path) -> String {
    format!("{} --config {} %f %p", command_path(&bin("wal-fetch")), command_path(config))
}

/// Appends `name = 'value'` lines to a configuration file; later lines win, so this overrides.
pub fn append_settings(file: &Path, settings: &[(&str, &str)]) {
    let mut text = String::from("\n# walship tests\n");
    for (name, value) in settings {
        text.push_str(&format!("{name} = {}\n", conf_quote(value)));
    }
    let mut f = fs::OpenOptions::new().append(true).create(true).open(file).unwrap_or_else(|e| panic!("{file:?}: {e}"));
    f.write_all(text.as_bytes()).unwrap_or_else(|e| panic!("write {file:?}: {e}"));
    drop(f);
    chown_to_server_user(file);
}

/// Panics with `what`, the command's output and the exit code unless it succeeded.
fn check(what: &str, out: Output) -> Output {
    assert!(out.code == Some(0), "{what} failed (exit {:?})\nstdout: {}\nstderr: {}", out.code, out.stdout, out.stderr);
    out
}

/// A throwaway PostgreSQL cluster (its server may or may not be running).
pub struct Cluster {
    name: String,
    /// The PostgreSQL installation whose programs run this cluster.
    install: PgInstall,
    // Dropped after `Drop::drop` has stopped the server, taking data, socket and log with it.
    scratch: Scratch,
    data: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    /// The postmaster's pid while we believe it runs; the last resort if pg_ctl cannot stop it.
    postmaster: Option<libc::pid_t>,
}

impl Cluster {
    /// Creates the directories of a cluster named `name` (used in directory names and messages), run
    /// by `install`'s programs.
    fn empty_in(install: &PgInstall, name: &str) -> Cluster {
        let scratch = Scratch::new(&format!("pg-{name}"));
        let data = scratch.mkdir("data");
        let socket_dir = scratch.mkdir("sock");
        // sun_path holds 108 bytes including the terminating NUL, and PostgreSQL refuses longer ones
        // with a message that only shows in the server log.
        let socket_len = socket_dir.join(format!(".s.PGSQL.{PORT}")).as_os_str().len();
        assert!(socket_len < 100, "socket path under {socket_dir:?} too long ({socket_len} bytes): set TMPDIR shorter");
        let log = scratch.path().join("server.log");
        Cluster { name: name.to_owned(), install: install.clone(), scratch, data, socket_dir, log, postmaster: None }
    }

    /// A PostgreSQL program of this cluster's installation, run as [`pg_command`] runs one.
    pub fn command(&self, program: &str) -> Command {
        program_command(&self.install.program(program), self.scratch.path())
    }

    /// The installation whose programs run this cluster.
    pub fn install(&self) -> &PgInstall {
        &self.install
    }

    /// Runs initdb for a new cluster, with `--wal-segsize` when `wal_segsize_mb` is given; then
    /// points it at its own socket directory with TCP off. Not started.
    pub fn init(name: &str, wal_segsize_mb: Option<u32>) -> Cluster {
        Cluster::init_in(&PgInstall::default_install(), name, wal_segsize_mb)
    }

    /// [`init`](Self::init) with `install`'s programs.
    pub fn init_in(install: &PgInstall, name: &str, wal_segsize_mb: Option<u32>) -> Cluster {
        let cluster = Cluster::empty_in(install, name);
        let mut cmd = cluster.command("initdb");
        // --no-sync: a throwaway cluster need not survive a power cut, and it saves seconds.
        cmd.arg("-D").arg(&cluster.data).args(["--no-sync", "--auth=trust", "--locale=C", "--encoding=UTF8"]);
        if let Some(mb) = wal_segsize_mb {
            cmd.arg(format!("--wal-segsize={mb}"));
        }
        check(&format!("initdb of cluster {name}"), run(&mut cmd));
        cluster.configure_own();
        cluster
    }

    /// A new cluster with 1 MiB segments (many segments from little data) that archives with
    /// `archive_command` (`""`: archiving paused, so segments wait `.ready`), with `settings` on
    /// top; started.
    pub fn start_archiving(name: &str, archive_command: &str, settings: &[(&str, &str)]) -> Cluster {
        Cluster::start_archiving_in(&PgInstall::default_install(), name, archive_command, settings)
    }

    /// [`start_archiving`](Self::start_archiving) with `install`'s programs.
    pub fn start_archiving_in(
        install: &PgInstall,
        name: &str,
        archive_command: &str,
        settings: &[(&str, &str)],
    ) -> Cluster {
        let mut cluster = Cluster::init_in(install, name, Some(1));
        cluster.configure(&[("wal_level", "replica"), ("archive_mode", "on"), ("archive_command", archive_command)]);
        cluster.configure(settings);
        cluster.start();
        cluster
    }

    /// Makes a cluster from a copy of the plain-format base backup in `backup`, ready for archive
    /// recovery: `settings` (restore_command, recovery targets...) go to postgresql.auto.conf and
    /// `recovery.signal` is created. The backup itself is left untouched, so it can be restored
    /// again. Not started.
    pub fn restore(name: &str, backup: &Path, settings: &[(&str, &str)]) -> Cluster {
        Cluster::restore_in(&PgInstall::default_install(), name, backup, settings)
    }

    /// [`restore`](Self::restore) with `install`'s programs.
    pub fn restore_in(install: &PgInstall, name: &str, backup: &Path, settings: &[(&str, &str)]) -> Cluster {
        let cluster = Cluster::empty_in(install, name);
        // cp -a as the server user keeps the modes PostgreSQL insists on and makes it the owner.
        let mut cmd = Command::new("cp");
        cmd.arg("-a").arg(backup.join(".")).arg(&cluster.data).current_dir(cluster.scratch.path());
        as_server_user(&mut cmd);
        check(&format!("copying base backup {backup:?} for cluster {name}"), run(&mut cmd));
        fs::set_permissions(&cluster.data, fs::Permissions::from_mode(0o700)).unwrap();
        // The copied postgresql.conf still names the socket directory of the backed-up cluster.
        cluster.configure_own();
        append_settings(&cluster.data.join("postgresql.auto.conf"), settings);
        let signal = cluster.data.join("recovery.signal");
        fs::write(&signal, "").unwrap();
        chown_to_server_user(&signal);
        cluster
    }

    /// A cluster whose data directory ([`data_dir`](Self::data_dir)) does not exist yet: something
    /// else creates it there (base-fetch restoring a backup), then [`adopt_data_dir`](Self::adopt_data_dir)
    /// makes it this cluster's. The directory goes with the cluster, like every other one's.
    pub fn without_data_dir(name: &str) -> Cluster {
        Cluster::without_data_dir_in(&PgInstall::default_install(), name)
    }

    /// [`without_data_dir`](Self::without_data_dir) with `install`'s programs.
    pub fn without_data_dir_in(install: &PgInstall, name: &str) -> Cluster {
        let cluster = Cluster::empty_in(install, name);
        fs::remove_dir(&cluster.data).unwrap_or_else(|e| panic!("{:?}: {e}", cluster.data));
        cluster
    }

    /// A streaming standby of `primary` (which must be running, with `wal_level = replica`): a
    /// `pg_basebackup -R` of it, so that `standby.signal` and a `primary_conninfo` naming the
    /// primary's socket are in place, pointed at its own socket directory. Not started.
    pub fn standby_of(primary: &Cluster, name: &str) -> Cluster {
        let cluster = Cluster::empty_in(&primary.install, name);
        primary.base_backup(&cluster.data, &["-R", "-X", "stream"]);
        assert!(cluster.data.join("standby.signal").is_file(), "pg_basebackup -R wrote no standby.signal");
        cluster.configure_own();
        cluster
    }

    /// Points the data directory that someone else filled (see
    /// [`without_data_dir`](Self::without_data_dir)) at this cluster's socket directory, with TCP
    /// off: its postgresql.conf still names the socket directory of the cluster it was copied from.
    /// Nothing else is changed.
    pub fn adopt_data_dir(&self) {
        assert!(self.data.join("PG_VERSION").is_file(), "cluster {}: no data directory at {:?}", self.name, self.data);
        self.configure_own();
    }

    /// Sets libpq's environment on `cmd` so that a client program connects to this cluster (PGHOST,
    /// PGPORT), with every other PG* variable of whoever runs the tests removed and English
    /// messages (LC_ALL=C).
    pub fn libpq_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        clear_pg_env(cmd).env("PGHOST", &self.socket_dir).env("PGPORT", PORT.to_string()).env("LC_ALL", "C")
    }

    /// What keeps this cluster off the network and off every other cluster's socket.
    fn own_settings(&self) -> [(&'static str, String); 3] {
        let socket_dir = self.socket_dir.to_str().expect("UTF-8 path").to_owned();
        [("listen_addresses", String::new()), ("unix_socket_directories", socket_dir), ("port", PORT.to_string())]
    }

    fn configure_own(&self) {
        let settings = self.own_settings();
        let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.configure(&settings);
    }

    /// Appends settings to postgresql.conf (taking effect at the next start or reload).
    pub fn configure(&self, settings: &[(&str, &str)]) {
        append_settings(&self.data.join("postgresql.conf"), settings);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    pub fn port(&self) -> u16 {
        PORT
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole server log so far.
    pub fn log_contents(&self) -> String {
        fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The last lines of the server log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log_contents();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        format!("--- last lines of {:?} (cluster {}) ---\n{tail}\n---", self.log, self.name)
    }

    /// Starts the server and waits until it accepts connections (read-only ones during archive
    /// recovery). Panics with the tail of the server log if it does not come up.
    pub fn start(&mut self) {
        let out = self.try_start();
        self.assert_pg_ctl_ok("starting", &out);
    }

    /// Panics unless pg_ctl succeeded at `doing` this cluster, with its output and the server log.
    fn assert_pg_ctl_ok(&self, doing: &str, out: &Output) {
        assert!(
            out.code == Some(0),
            "{doing} cluster {} failed (exit {:?})\n{}{}\n{}",
            self.name,
            out.code,
            out.stdout,
            out.stderr,
            self.log_tail()
        );
    }

    /// Tries to start the server, as [`start`](Self::start) does, and returns what pg_ctl did
    /// instead of panicking: for tests of directories that must not start.
    pub fn try_start(&mut self) -> Output {
        let timeout = WAIT_TIMEOUT.as_secs().to_string();
        let out = run(self
            .command("pg_ctl")
            .args(["start", "-w", "-t", &timeout, "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log));
        // Read the pid even after a failure: a server still starting when pg_ctl gave up must be
        // stopped by Drop too.
        self.postmaster = self.read_postmaster_pid();
        out
    }

    /// Waits until this standby has replayed everything `primary` has written so far.
    pub fn wait_replayed(&self, primary: &Cluster) {
        let lsn = primary.psql("select pg_current_wal_flush_lsn()");
        self.wait_for(&format!("the standby has replayed up to {lsn}"), WAIT_TIMEOUT, || {
            match self.try_psql(&format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"))? {
                done if done == "t" => Ok(()),
                _ => Err(self.try_psql("select pg_last_wal_replay_lsn()").unwrap_or_default()),
            }
        });
    }

    fn read_postmaster_pid(&self) -> Option<libc::pid_t> {
        fs::read_to_string(self.data.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
    }

    /// Whether the postmaster we started is still alive.
    pub fn is_running(&self) -> bool {
        let Some(pid) = self.postmaster else { return false };
        // A dead postmaster is not our child: it stays a zombie until init gets round to reaping it,
        // and kill(pid, 0) succeeds on a zombie.
        if let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) {
            let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
            return !matches!(state, Some('Z' | 'X'));
        }
        // SAFETY: kill with signal 0 only checks that the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    /// Clean shutdown (`-m fast`): the server switches to a new WAL file and archives the rest.
    pub fn stop(&mut self) {
        self.stop_in_mode("fast", "stopping");
    }

    /// Stops the server the way a crash would (`-m immediate`): nothing more is written or archived.
    pub fn crash(&mut self) {
        self.stop_in_mode("immediate", "crashing");
    }

    /// `pg_ctl stop -m MODE`, panicking with the server log (`doing` names it) if it fails.
    fn stop_in_mode(&mut self, mode: &str, doing: &str) {
        let out = self.pg_ctl_stop(mode);
        self.assert_pg_ctl_ok(doing, &out);
        self.postmaster = None;
    }

    fn pg_ctl_stop(&self, mode: &str) -> Output {
        let timeout = WAIT_TIMEOUT.as_secs().to_string();
        run(self.command("pg_ctl").args(["stop", "-w", "-t", &timeout, "-m", mode, "-D"]).arg(&self.data))
    }

    fn psql_command(&self) -> Command {
        let mut cmd = self.command("psql");
        cmd.args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-h"]).arg(&self.socket_dir).args([
            "-p",
            &PORT.to_string(),
            "-d",
            "postgres",
        ]);
        cmd
    }

    /// Runs SQL through psql; the trimmed output (unaligned, tuples only), or psql's error message.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = run(self.psql_command().arg("-c").arg(sql));
        if out.code == Some(0) {
            Ok(out.stdout.trim().to_owned())
        } else {
            Err(format!("exit {:?}: {}", out.code, out.stderr.trim()))
        }
    }

    /// Runs SQL through psql and returns its trimmed output; panics (with the server log) on error.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| panic!("psql on cluster {}: {sql}\n{e}\n{}", self.name, self.log_tail()))
    }

    /// Runs a query that returns one integer (`select count(*) ...`) and returns it; panics with
    /// the query and what came back otherwise.
    pub fn count(&self, sql: &str) -> i64 {
        let text = self.psql(sql);
        text.parse().unwrap_or_else(|_| panic!("cluster {}: {sql}: {text:?}", self.name))
    }

    /// Runs pgbench against the `postgres` database with `args` (`-i -s 5`, `-T 5 -c 2`...) and
    /// returns its standard output.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let out = run(&mut self.pgbench_command(args));
        check(&format!("pgbench {args:?} on cluster {}", self.name), out).stdout
    }

    /// The pgbench command [`pgbench`](Self::pgbench) runs, for running it in the background.
    pub fn pgbench_command(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("pgbench");
        cmd.arg("-h").arg(&self.socket_dir).args(["-p", &PORT.to_string()]).args(args).arg("postgres");
        cmd
    }

    /// Takes a base backup into `dir` (which must exist, empty and owned by the server user) with
    /// `pg_basebackup -D dir --checkpoint=fast` plus `args` (say `-Fp -X none`).
    pub fn base_backup(&self, dir: &Path, args: &[&str]) {
        let out = run(self
            .command("pg_basebackup")
            .arg("-h")
            .arg(&self.socket_dir)
            .args(["-p", &PORT.to_string(), "-D"])
            .arg(dir)
            // The default spread checkpoint can take minutes on an idle server.
            .arg("--checkpoint=fast")
            .args(args));
        check(&format!("pg_basebackup of cluster {}", self.name), out);
    }

    /// Polls `probe` until it returns `Ok`, failing after `timeout` with `what`, the last state
    /// `probe` reported and the server log.
    fn wait_for<T>(&self, what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
        let started = Instant::now();
        loop {
            let last = match probe() {
                Ok(value) => return value,
                Err(state) => state,
            };
            // A server that died will never get there: say so now rather than at the deadline.
            if !self.is_running() {
                panic!("cluster {} stopped while waiting until {what} (last: {last})\n{}", self.name, self.log_tail());
            }
            if started.elapsed() > timeout {
                panic!(
                    "cluster {}: timed out after {timeout:?} waiting until {what} (last: {last})\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until the WAL file `wal_name` (a segment, `.partial` or `.history` name) has been
    /// archived successfully, at most `timeout`.
    pub fn wait_archived(&self, wal_name: &str, timeout: Duration) {
        let done = self.data.join("pg_wal/archive_status").join(format!("{wal_name}.done"));
        self.wait_for(&format!("{wal_name} is archived"), timeout, || {
            // The .done marker can be gone already if a checkpoint recycled the segment; the
            // archiver's statistics then still name the file, unless a later one followed.
            if done.exists() {
                return Ok(());
            }
            let stats = self.try_psql(
                "select coalesce(last_archived_wal, ''), archived_count, failed_count, \
                 coalesce(last_failed_wal, '') from pg_stat_archiver",
            )?;
            if stats.split('|').next() == Some(wal_name) { Ok(()) } else { Err(format!("pg_stat_archiver: {stats}")) }
        })
    }

    /// Forces a switch to a new WAL file and returns the name of the one just completed, which the
    /// archiver will pick up next.
    pub fn switch_wal(&self) -> String {
        self.psql("select pg_walfile_name(pg_switch_wal())")
    }

    /// Waits until archive recovery has finished and the server accepts writes, at most `timeout`.
    pub fn wait_recovered(&self, timeout: Duration) {
        self.wait_for("recovery has finished", timeout, || match self.try_psql("select pg_is_in_recovery()")? {
            state if state == "f" => Ok(()),
            state => Err(format!("pg_is_in_recovery() = {state}")),
        });
    }

    /// The timeline of the latest checkpoint, after forcing one: after a promotion the server
    /// requests a checkpoint but does not wait for it, so pg_control could still name the old one.
    pub fn checkpoint_timeline(&self) -> u32 {
        self.psql("checkpoint");
        let tli = self.psql("select timeline_id from pg_control_checkpoint()");
        tli.parse().unwrap_or_else(|_| panic!("timeline_id {tli:?} of cluster {}", self.name))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.postmaster.is_none() && !self.data.join("postmaster.pid").exists() {
            return;
        }
        // Never panic here: this may run while a failed test unwinds.
        let out = self.pg_ctl_stop("immediate");
        if out.code != Some(0) {
            eprintln!("pg_ctl stop of cluster {} failed: {}{}", self.name, out.stdout, out.stderr);
            if let Some(pid) = self.postmaster {
                // SIGQUIT is the postmaster's immediate shutdown.
                // SAFETY: plain kill(2) on a pid we started.
                unsafe { libc::kill(pid, libc::SIGQUIT) };
            }
        }
    }
}

/// The wal-fetch prefetch worker processes whose working directory is `data_dir` (the data
/// directory of the recovery they serve).
pub fn prefetch_workers(data_dir: &Path) -> Vec<u32> {
    let Ok(data_dir) = std::fs::canonicalize(data_dir) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let is_worker = cmdline.split(|b| *b == 0).any(|arg| arg == b"--prefetch-worker");
        if is_worker && std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd == data_dir) {
            found.push(pid);
        }
    }
    found
}

/// A stand-in postmaster for a recovery without a server (what wal-fetch's prefetch looks for): a
/// `sleep` process whose pid, with the data directory and a start time, goes into
/// `data/postmaster.pid` in PostgreSQL's layout. Kill it to make the "server" die.
pub fn fake_postmaster(data: &Path) -> std::process::Child {
    let postmaster = Command::new("sleep")
        .arg("600")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sleep as the fake postmaster");
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let pid_file =
        format!("{}\n{}\n{started}\n5432\n/tmp\n\n  5432001         0\nready   \n", postmaster.id(), data.display());
    crate::segments::write_file(&data.join("postmaster.pid"), pid_file.as_bytes());
    postmaster
}
