//! Which repository a cluster archives into, remembered inside its data directory, so that wal-push
//! never starts a new repository in place of the one the cluster's history is in.
//!
//! ```text
//! $PGDATA/walship/repositories/<hash of the location>    {"location": ..., "repository_id": ...}
//! ```
//!
//! The danger: the repository's file system is not mounted (NFS, a backup disk), or its bucket
//! prefix was emptied. A first push would create a fresh `repository.json` in the empty place and
//! archiving would go on there; the segments are hidden when the mount returns, and a recovery stops
//! at the gap. So after the first successful push into a location, wal-push writes (durably) the id
//! of the repository there, and refuses (exit 6) to push into that location while it holds no
//! repository or another one. Starting a new repository there is a deliberate step: remove the file.
//!
//! The file lives in the data directory itself, not under `pg_wal/walship` (which is safe to delete):
//! pg_basebackup copies it, so a restored copy of the cluster knows the same repository. Pointed at
//! the same location it finds the same id; pointed at a new location (another hash) it creates a
//! repository there as usual. Only pushes of files in a data directory's `pg_wal` are covered; a
//! file archived by hand from elsewhere has no data directory to remember anything in.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::codec::ContentDigest;
use crate::error::Error;
use crate::fs::{self as files, create_dirs_durably};
use crate::log::Log;
use crate::repo::{IDENTITY_KEY, Identity, Repository};
use crate::retry::{self, Deadline};

/// The directory, relative to the data directory.
pub const DIR: &str = "walship/repositories";
const MAX_LEN: u64 = 4096;

/// What is remembered of one location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    /// The location (as `Config::store_location` names it), for whoever reads the file.
    location: String,
    /// The repository's id; `None` for a repository made before walship wrote ids.
    repository_id: Option<String>,
}

/// A data directory's memory of one repository location.
#[derive(Debug, Clone)]
pub struct Remembered {
    data_dir: PathBuf,
    file: PathBuf,
    location: String,
}

impl Remembered {
    /// For a push of a file in `pg_wal` (the directory holding `archive_status`): the data directory
    /// is its parent, if that is one (`PG_VERSION` in it). `location` names the repository.
    pub fn for_pg_wal(pg_wal: &Path, location: &str) -> Option<Remembered> {
        // Absolute, so that the error message names the file wherever the reader stands (the
        // archiver runs us inside the data directory, and %p is relative to it).
        let data_dir = files::parent_dir(pg_wal);
        let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        if !data_dir.join("PG_VERSION").is_file() {
            return None;
        }
        let key = &ContentDigest::of(location.as_bytes()).sha256_hex()[..32];
        let file = data_dir.join(DIR).join(key);
        Some(Remembered { data_dir, file, location: location.to_owned() })
    }

    /// The file that holds the memory, for messages (and for an operator who means to remove it).
    pub fn file(&self) -> &Path {
        &self.file
    }

    fn read(&self) -> Result<Option<Entry>, Error> {
        use std::io::Read;
        let mut text = String::new();
        match fs::File::open(&self.file) {
            Ok(file) => file.take(MAX_LEN).read_to_string(&mut text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => Err(e),
        }
        .map_err(|e| Error::local_io(&self.file, "read", e))?;
        match serde_json::from_str::<Entry>(&text) {
            Ok(entry) if entry.location == self.location => Ok(Some(entry)),
            _ => Err(Error::WrongRepository {
                location: self.file.display().to_string(),
                reason: format!(
                    "not a record of the repository at {} (damaged, or put there by hand); remove it if \
                     that is the repository this cluster archives into",
                    self.location
                ),
            }),
        }
    }

    /// Refuses a push into a location where this cluster archived before, unless the repository
    /// found there now is that same one. Reads the identity record (within `deadline`); the
    /// repository keeps it, so the pushes that follow see exactly what was checked here.
    pub async fn check(&self, repo: &Repository, deadline: Deadline, log: &Log) -> Result<(), Error> {
        let Some(entry) = self.read()? else { return Ok(()) };
        let identity_location = repo.storage().location(IDENTITY_KEY);
        let identity = retry::until(deadline, log, &identity_location, || repo.identity()).await?;
        let found = match &identity {
            Some(identity) if identity.repository_id == entry.repository_id => return Ok(()),
            Some(identity) => format!("it now holds another repository ({})", describe(&identity.repository_id)),
            None => "it holds no repository identity record now (not mounted? emptied?)".to_owned(),
        };
        Err(Error::WrongRepository {
            location: identity_location,
            reason: format!(
                "this cluster archived into repository {} here, but {found}; nothing was written. To start \
                 a new repository here on purpose, remove {}",
                describe(&entry.repository_id),
                self.file.display()
            ),
        })
    }

    /// Remembers `identity` as the repository of this location, durably, unless it already is.
    pub fn remember(&self, identity: &Identity) -> Result<(), Error> {
        if self.read().ok().flatten().is_some_and(|entry| entry.repository_id == identity.repository_id) {
            return Ok(());
        }
        let entry = Entry { location: self.location.clone(), repository_id: identity.repository_id.clone() };
        let json = serde_json::to_string_pretty(&entry).expect("plain struct serializes");
        self.write(&json).map_err(|e| Error::local_io(&self.file, "write", e))
    }

    /// Durably: each directory created is fsynced in its parent, the file is replaced durably.
    fn write(&self, json: &str) -> std::io::Result<()> {
        let dir = self.file.parent().expect("a file in DIR");
        create_dirs_durably(&self.data_dir, dir)?;
        // What a killed writer left: nothing else ever looks in this directory of the data directory.
        files::remove_orphaned_temp_files(dir);
        files::replace_file(&self.file, format!("{json}\n").as_bytes(), true)
    }
}

fn describe(id: &Option<String>) -> String {
    match id {
        Some(id) => id.clone(),
        None => "(one made before repository ids)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ExitCode;
    use crate::repo::ClusterFacts;
    use crate::storage::local::LocalStorage;

    fn repo(dir: &Path) -> Repository {
        Repository::with_storage(Box::new(LocalStorage::open(dir).unwrap()), format!("file://{}", dir.display()))
    }

    const FACTS: ClusterFacts = ClusterFacts { system_identifier: 7, pg_version: 15, wal_segment_size: 16 << 20 };

    fn data_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("PG_VERSION"), "15\n").unwrap();
        fs::create_dir(dir.path().join("pg_wal")).unwrap();
        dir
    }

    fn deadline() -> Deadline {
        Deadline::starting_now(std::time::Duration::from_secs(5))
    }

    #[test]
    fn only_a_data_directory_remembers() {
        let plain = tempfile::tempdir().unwrap();
        assert!(Remembered::for_pg_wal(&plain.path().join("pg_wal"), "file:///r").is_none());
        let data = data_dir();
        let a = Remembered::for_pg_wal(&data.path().join("pg_wal"), "file:///r").unwrap();
        let b = Remembered::for_pg_wal(&data.path().join("pg_wal"), "file:///other").unwrap();
        assert!(a.file().starts_with(data.path().join(DIR)));
        assert_ne!(a.file(), b.file(), "one file per location");
    }

    #[tokio::test]
    async fn an_emptied_or_replaced_location_is_refused_until_the_memory_is_removed() {
        let data = data_dir();
        let store = tempfile::tempdir().unwrap();
        let location = format!("file://{}", store.path().display());
        let memory = Remembered::for_pg_wal(&data.path().join("pg_wal"), &location).unwrap();
        let log = Log::quiet();
        memory.check(&repo(store.path()), deadline(), &log).await.unwrap();
        let first = repo(store.path()).ensure_identity(&FACTS, "seg").await.unwrap();
        memory.remember(&first).unwrap();
        memory.check(&repo(store.path()), deadline(), &log).await.unwrap();

        fs::remove_file(store.path().join(IDENTITY_KEY)).unwrap();
        let err = memory.check(&repo(store.path()), deadline(), &log).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::WrongRepository);
        let text = err.to_string();
        for part in [IDENTITY_KEY, first.repository_id.as_deref().unwrap(), "not mounted", "remove"] {
            assert!(text.contains(part), "{part:?} missing in: {text}");
        }
        assert!(text.contains(&memory.file().display().to_string()), "{text}");

        let second = repo(store.path()).ensure_identity(&FACTS, "seg").await.unwrap();
        let err = memory.check(&repo(store.path()), deadline(), &log).await.unwrap_err();
        assert!(err.to_string().contains("another repository"), "{err}");

        fs::remove_file(memory.file()).unwrap();
        memory.check(&repo(store.path()), deadline(), &log).await.unwrap();
        memory.remember(&second).unwrap();
        memory.check(&repo(store.path()), deadline(), &log).await.unwrap();
        let orphan = memory.file().parent().unwrap().join(".x.walship.2147483000.tmp");
        fs::write(&orphan, b"left by a killed wal-push").unwrap();
        fs::remove_file(memory.file()).unwrap();
        memory.remember(&second).unwrap();
        let leftovers: Vec<_> = fs::read_dir(memory.file().parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
    }

    #[tokio::test]
    async fn a_damaged_memory_is_refused_rather_than_ignored() {
        let data = data_dir();
        let store = tempfile::tempdir().unwrap();
        let memory = Remembered::for_pg_wal(&data.path().join("pg_wal"), "file:///r").unwrap();
        memory.remember(&repo(store.path()).ensure_identity(&FACTS, "seg").await.unwrap()).unwrap();
        fs::write(memory.file(), b"{\"loc").unwrap();
        let err = memory.check(&repo(store.path()), deadline(), &Log::quiet()).await.unwrap_err();
        assert_eq!(err.exit_code(), ExitCode::WrongRepository, "{err}");
        assert!(err.to_string().starts_with(&memory.file().display().to_string()), "{err}");
    }
}
