//! The PostgreSQL installations the tests run: 15 from Debian (or `$WALSHIP_PG_BIN`) by default, and
//! the pinned builds of 13, 14, 16, 17 and 18 that `scripts/install-postgres.sh` puts in its cache.
//!
//! Some builds carry only the server (initdb, pg_ctl, postgres), perhaps with the programs that must
//! be of a backup's own major version added. Their clusters are driven with PostgreSQL 18's client
//! programs (pg_basebackup, psql and pgbench speak to older servers), and so are 13's and 14's even in
//! a complete build: their pg_basebackup writes a tar stream to stdout that is not one (the injected
//! backup_manifest lacks its padding to 512 bytes), which base-push rightly refuses. The programs that
//! must be of the backup's own major version (pg_verifybackup, pg_combinebackup, pg_waldump) are
//! taken from the build's own directory only, so a missing one stays missing.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The majors of the version matrix.
pub const MATRIX: [u32; 6] = [13, 14, 15, 16, 17, 18];

/// The complete build whose client programs drive the server-only ones.
pub const CLIENT_MAJOR: u32 = 18;

/// The first major whose pg_basebackup writes a well-formed tar stream to stdout (`-D - -Ft`), as
/// base-push runs it: 13's and 14's leave the injected backup_manifest unpadded.
pub const FIRST_STDOUT_TAR_MAJOR: u32 = 15;

/// Programs that run a cluster: always the build's own.
const SERVER_PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];
/// Programs that work only on their own major version's files: the build's own or none.
pub const VERSION_BOUND_PROGRAMS: [&str; 4] = ["pg_verifybackup", "pg_combinebackup", "pg_waldump", "pg_controldata"];

/// One PostgreSQL installation: where its programs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgInstall {
    /// The major version.
    pub major: u32,
    /// The build's own bin directory.
    pub own: PathBuf,
    /// Where the other client programs come from: `own` when the build is complete.
    pub clients: PathBuf,
}

/// The cache `scripts/install-postgres.sh` fills, by the same rule.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WALSHIP_PG_CACHE") {
        return dir.into();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return "/var/cache/walship-tests/postgresql".into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
    base.join("walship-tests/postgresql")
}

impl PgInstall {
    /// The default installation: `$WALSHIP_PG_BIN`, else Debian's PostgreSQL 15.
    pub fn default_install() -> PgInstall {
        let own = crate::pg::pg_bin_dir();
        let major = major_of(&own);
        PgInstall { major, clients: own.clone(), own }
    }

    /// The installation of major version `major`: the default one for 15, else the cached build.
    pub fn of(major: u32) -> PgInstall {
        if major == 15 && std::env::var_os("WALSHIP_PG_BIN").is_none() {
            return PgInstall::default_install();
        }
        let own = cache_dir().join(major.to_string()).join("bin");
        assert!(
            own.join("postgres").is_file(),
            "no PostgreSQL {major} in {own:?}: run scripts/install-postgres.sh (scripts/test.sh does)"
        );
        let own_clients = own.join("pg_basebackup").is_file() && major >= FIRST_STDOUT_TAR_MAJOR;
        let clients = if own_clients { own.clone() } else { PgInstall::of(CLIENT_MAJOR).own };
        PgInstall { major, own, clients }
    }

    /// The program `name` of this installation: server and version-bound programs from its own
    /// directory (which may lack the latter), every other one from where its client programs come.
    pub fn program(&self, name: &str) -> PathBuf {
        if SERVER_PROGRAMS.contains(&name) || VERSION_BOUND_PROGRAMS.contains(&name) {
            self.own.join(name)
        } else {
            self.clients.join(name)
        }
    }

    /// Whether the build has `name` of its own (pg_verifybackup, pg_combinebackup...).
    pub fn has_own(&self, name: &str) -> bool {
        self.own.join(name).is_file()
    }

    /// PATH for walship's commands run against this installation's clusters: the client programs'
    /// directory first, so that base-push runs that pg_basebackup even where the build has an older
    /// one of its own, then the build's own directory, then the inherited PATH. base-fetch picks
    /// pg_verifybackup by its version, whatever the order, so it finds the build's own where there
    /// is one.
    pub fn path(&self) -> OsString {
        let mut dirs = vec![self.clients.clone()];
        if self.clients != self.own {
            dirs.push(self.own.clone());
        }
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        std::env::join_paths(dirs).expect("PATH entries without ':'")
    }
}

/// The major version of the postgres in `bin`.
fn major_of(bin: &Path) -> u32 {
    let out = std::process::Command::new(bin.join("postgres")).arg("--version").output().expect("postgres --version");
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let number = line.split(") ").nth(1).unwrap_or_default();
    let digits: String = number.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("{bin:?}/postgres --version said {line:?}"))
}
