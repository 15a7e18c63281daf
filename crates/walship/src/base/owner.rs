//! Owner records: who is writing a backup, so that a base-push killed outright (no chance to clean
//! up) is cleaned up by the next one, and a live one elsewhere is left alone.
//!
//! The owner record (`backups/<NAME>/owner.json`) is the first object of a backup and claims its
//! name; the catalog record is the last. A backup with the one and not the other is either being
//! written or abandoned: the owner's host, boot and process (with its start time, against pid
//! reuse) tell which.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::recovery::now_rfc3339;
use super::{BACKUPS_PREFIX, BackupRecord};
use crate::error::Error;
use crate::log::Log;
use crate::process::start_time as process_start;
use crate::repo::Repository;
use crate::storage::{PutOptions, StorageError};

/// Who is writing a backup, so that a later base-push can tell a dead writer from a live one.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Owner {
    host: String,
    boot_id: String,
    pid: u32,
    /// The process start time in clock ticks since boot (/proc/PID/stat), against pid reuse.
    pid_start: u64,
    started_at: String,
}

impl Owner {
    /// This process, now.
    pub(crate) fn current() -> Owner {
        let pid = std::process::id();
        Owner {
            host: read_trimmed("/proc/sys/kernel/hostname"),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            started_at: now_rfc3339(),
        }
    }

    /// Certain to be dead: on this host, and either booted since or its process is gone.
    pub(crate) fn is_dead(&self, me: &Owner) -> bool {
        self.host == me.host
            && (self.boot_id != me.boot_id || process_start(self.pid).is_none_or(|start| start != self.pid_start))
    }
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// An owner record is a few lines of JSON.
const MAX_OWNER_LEN: u64 = 64 * 1024;

/// The key of backup `name`'s owner record.
pub(crate) fn owner_key(name: &str) -> String {
    format!("{BACKUPS_PREFIX}{name}/owner.json")
}

/// Claims a backup name by creating its owner record (of this process); a name taken in the same
/// second waits for the next.
pub(super) async fn reserve_name(repo: &Repository) -> Result<String, Error> {
    let mut json = serde_json::to_vec_pretty(&Owner::current()).expect("plain struct serializes");
    json.push(b'\n');
    for _ in 0..5 {
        let now = time::OffsetDateTime::now_utc();
        let name = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let mut writer = repo.storage().create(&owner_key(&name), PutOptions::default()).await?;
        writer.write(Bytes::from(json.clone())).await?;
        match writer.commit().await {
            Ok(()) => return Ok(name),
            Err(StorageError::AlreadyExists { .. }) => tokio::time::sleep(Duration::from_millis(1100)).await,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Storage(StorageError::Other {
        location: repo.storage().location(BACKUPS_PREFIX),
        message: "could not claim a backup name: another base-push is starting at the same time".into(),
        retryable: false,
    }))
}

/// Deletes `keys`, best effort, newest first so that the owner record goes last.
pub(super) async fn remove_keys(repo: &Repository, keys: &[String], log: &Log) {
    for key in keys.iter().rev() {
        match repo.storage().delete(key).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => log.info(format_args!("warning: could not remove {}: {e}", repo.storage().location(key))),
        }
    }
    if let Some(key) = keys.first()
        && let Some(dir) = key.rsplit_once('/').map(|(dir, _)| format!("{dir}/"))
    {
        let _ = repo.storage().remove_incomplete(&dir).await;
    }
}

/// Removes what killed base-push runs on this host left: backups with an owner record but no catalog
/// record, whose owner process is gone. Backups of live processes, and of other hosts, are left
/// alone (a base-push elsewhere may still be running).
pub(super) async fn sweep_abandoned(repo: &Repository, log: &Log) -> Result<(), Error> {
    let me = Owner::current();
    let mut abandoned = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = repo.storage().list(BACKUPS_PREFIX, after.as_deref(), 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for meta in &page {
            let Some(name) = meta.key.strip_prefix(BACKUPS_PREFIX).and_then(|k| k.strip_suffix("/owner.json")) else {
                continue;
            };
            if super::validate_name(name).is_err() {
                continue;
            }
            match repo.storage().head(&BackupRecord::catalog_key(name)).await {
                Ok(_) => continue,
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            let owner: Option<Owner> =
                repo.read_small(&meta.key, MAX_OWNER_LEN).await.ok().and_then(|b| serde_json::from_slice(&b).ok());
            if owner.is_some_and(|owner| owner.is_dead(&me)) {
                abandoned.push(name.to_owned());
            }
        }
    }
    for name in abandoned {
        log.info(format_args!("removing backup {name}, left incomplete by a base-push that was killed"));
        let prefix = format!("{BACKUPS_PREFIX}{name}/");
        repo.storage().remove_incomplete(&prefix).await?;
        let mut keys = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = repo.storage().list(&prefix, after.as_deref(), 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            keys.extend(page.into_iter().map(|m| m.key).filter(|k| !k.ends_with("/owner.json")));
        }
        keys.insert(0, owner_key(&name));
        remove_keys(repo, &keys, log).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_owner_is_recognised_only_on_this_host() {
        let me = Owner::current();
        let alive = Owner::current();
        assert!(!alive.is_dead(&me));
        let gone = Owner { pid: u32::MAX - 1, ..Owner::current() };
        assert!(gone.is_dead(&me));
        let rebooted = Owner { boot_id: "another boot".into(), ..Owner::current() };
        assert!(rebooted.is_dead(&me));
        let elsewhere = Owner { host: "elsewhere".into(), pid: u32::MAX - 1, ..Owner::current() };
        assert!(!elsewhere.is_dead(&me));
    }
}
