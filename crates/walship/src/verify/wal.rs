//! wal-verify: is the archive whole and fresh? Every backup's WAL from its start to its stop, then
//! on to the newest archived segment along every timeline a recovery from it may follow; every
//! timeline's history file, agreeing with its parent's and with the segments present; the newest
//! object's age; and with `--deep` every object read back and checked against its checksum.
//!
//! One pass over `wal/`, page by page: what is kept of the listing is a set of segment ranges per
//! timeline ([`coverage::SegmentSet`]), the newest object, and the objects being checked at the
//! moment, so memory follows the gaps and the timelines, never the number of segments. The
//! decisions are pure and live in [`coverage`]. Nothing is written to the repository.

pub mod coverage;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use self::coverage::{BackupSpan, Histories, SegmentSet, TimelineFacts};
use super::{Finding, FindingKind};
use crate::base;
use crate::codec::{Prefix, PumpError};
use crate::encryption::{Sealed, check_sealed};
use crate::error::Error;
use crate::log::Log;
use crate::repo::{ConditionalWrites, IDENTITY_KEY, Identity, Repository};
use crate::retry;
use crate::storage::{CreateGuard, ObjectMeta, StorageError};
use crate::wal::{LongPageHeader, WalFileKind, WalFileName, parse_lsn, segment_file_name};

/// Where the WAL objects are.
const WAL_PREFIX: &str = "wal/";
/// Keys asked for per listing page.
const PAGE: usize = 1000;

/// How a run goes.
#[derive(Debug, Clone)]
pub struct WalVerifyOptions {
    /// The newest object older than this is a [`FindingKind::StaleArchive`].
    pub max_age: Option<Duration>,
    /// Read every WAL object and check it against its checksum.
    pub deep: bool,
    /// Objects checked at once with `deep` (at least 1).
    pub parallel: usize,
    /// Now, for the newest object's age.
    pub now: SystemTime,
    /// How long one step (a listing page, the catalog, one object's check) may retry transient
    /// failures: a deep run over a large archive takes longer than any one deadline.
    pub deadline: Duration,
    /// Probe the store's conditional writes now (a scratch object written and removed) rather than
    /// trust what the identity record says of them.
    pub probe_writes: bool,
}

/// One timeline as the archive shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimelineSummary {
    /// The timeline.
    pub timeline: u32,
    /// Its segments archived.
    pub segments: u64,
    /// Its lowest and highest archived segment, by name.
    pub first: Option<String>,
    /// See `first`.
    pub last: Option<String>,
    /// Whether its history file is there (timeline 1 has none).
    pub history: bool,
}

/// What `--deep` read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeepReport {
    /// Objects read and checked.
    pub verified_objects: u64,
    /// Of those, the damaged ones (each also a [`FindingKind::DamagedObject`]).
    pub damaged_objects: u64,
    /// Bytes read from the repository.
    pub stored_bytes: u64,
    /// Bytes they decoded to.
    pub original_bytes: u64,
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct WalReport {
    /// The problems: backups' own WAL, gaps, history files, the archive's age, damaged objects, no backups.
    pub findings: Vec<Finding>,
    /// WAL objects listed (segments, `.partial` segments, history files, backup labels).
    pub objects: u64,
    /// Segments among them.
    pub segments: u64,
    /// The object stored last, and when.
    pub newest_segment: Option<(String, SystemTime)>,
    /// Ranges of segments missing where a backup's recovery needs them (gaps and incomplete backups).
    pub gaps: u64,
    /// Segments in those ranges.
    pub missing_segments: u64,
    /// Complete backups in the catalog.
    pub backups: u64,
    /// Every timeline the archive mentions.
    pub timelines: Vec<TimelineSummary>,
    /// With `deep`, what was read.
    pub deep: Option<DeepReport>,
    /// What could not be checked because the repository is encrypted and this host has no key
    /// (history files, segments' page headers); `None` when everything was.
    pub without_key: Option<String>,
    /// What the store does with a create of an existing key: probed now with `probe_writes`, else as
    /// the identity record says (`Unknown` where it says nothing); `None` where creates are exclusive
    /// by construction (local disk, SFTP).
    pub conditional_writes: Option<CreateGuard>,
}

/// Checks the WAL archive of `repo`.
pub async fn wal_verify(repo: &Repository, options: &WalVerifyOptions, log: &Log) -> Result<WalReport, Error> {
    let step = options.deadline;
    let identity = retry::with_deadline(step, log, repo.url(), || repo.require_identity()).await?;
    let segment_size = identity.wal_segment_size;
    let (backups, mut findings) =
        retry::with_deadline(step, log, repo.url(), || read_backups(repo, segment_size)).await?;
    let (histories, unreadable, undecrypted) =
        retry::with_deadline(step, log, repo.url(), || read_histories(repo)).await?;
    findings.extend(unreadable.values().cloned());
    let (conditional_writes, store_finding) = judge_store(repo, &identity, options, log).await?;
    findings.extend(store_finding);
    let scan = scan(repo, options, log, &identity).await?;

    let mut known: BTreeSet<u32> = scan.present.timelines().chain(histories.keys().copied()).collect();
    known.extend(scan.lowest.keys().copied());
    known.extend(backups.iter().flat_map(|b| [b.timeline, b.stop_timeline]));
    let found = coverage::continuity(&backups, &scan.present, &histories, &known, segment_size);
    findings.extend(coverage::continuity_findings(&found, segment_size));
    let facts = TimelineFacts {
        lowest_segment: scan.lowest.clone(),
        backup_timelines: backups.iter().flat_map(|b| [b.timeline, b.stop_timeline]).collect(),
        unreadable: unreadable.keys().copied().chain(undecrypted.iter().copied()).collect(),
    };
    findings.extend(coverage::history_findings(&histories, &facts, segment_size));
    findings.extend(stale_finding(scan.newest.as_ref(), options));
    findings.extend(scan.damaged.iter().cloned());
    if backups.is_empty() && findings.iter().all(|f| f.kind != FindingKind::IncompleteBackupWal) {
        let message = "the catalog holds no complete base backup: nothing can be restored, whatever WAL is archived";
        findings.push(Finding::new(FindingKind::NoBackups, repo.url(), message));
    }
    let (gaps, missing_segments) = found.union();
    let without_key = without_key_note(repo, &undecrypted, options.deep);
    Ok(WalReport {
        conditional_writes,
        without_key,
        findings,
        objects: scan.objects,
        segments: scan.segments,
        newest_segment: scan.newest,
        gaps,
        missing_segments,
        backups: backups.len() as u64,
        timelines: known.iter().map(|&t| summary(t, &scan.present, &histories, segment_size)).collect(),
        deep: scan.deep,
    })
}

/// What the store does with a create of an existing key, and the finding if it does not refuse it.
async fn judge_store(
    repo: &Repository,
    identity: &Identity,
    options: &WalVerifyOptions,
    log: &Log,
) -> Result<(Option<CreateGuard>, Option<Finding>), Error> {
    if repo.storage().creates_exclusive_by_construction() {
        return Ok((None, None));
    }
    let recorded = identity.conditional_writes.as_ref();
    let consequence = "two writers of one name at the same moment (two clusters, or a restored copy archiving \
                       here) can both be told that their write succeeded while the later replaces the earlier";
    let (guard, message) = if options.probe_writes {
        let probed = retry::with_deadline(options.deadline, log, repo.url(), || repo.probe_store()).await?;
        let shortcoming = ConditionalWrites::shortcoming(probed.as_ref());
        let guard = probed.map_or(CreateGuard::Unknown, |p| p.guard);
        let trusted = recorded.is_some_and(|r| r.guard == CreateGuard::Enforced);
        let message = shortcoming.map(|s| match trusted {
            // Writers trust the record and do not read their writes back.
            true => format!(
                "probed now: {s}, but the identity record says the store enforced them when the repository was \
                 made: writers trust that record and do not read their writes back; {consequence}. Make a new \
                 repository on this store, whose record will say so"
            ),
            false => format!("probed now: {s}: {consequence}"),
        });
        (guard, message)
    } else {
        let guard = recorded.map_or(CreateGuard::Unknown, |r| r.guard);
        let message = ConditionalWrites::shortcoming(recorded)
            .map(|s| format!("{s}: {consequence} (wal-verify --probe-writes probes the store again)"));
        (guard, message)
    };
    let finding = message.map(|m| Finding::new(FindingKind::ConditionalWritesIgnored, IDENTITY_KEY, m));
    Ok((Some(guard), finding))
}

fn summary(timeline: u32, present: &SegmentSet, histories: &Histories, segment_size: u32) -> TimelineSummary {
    let (segments, first, last) = match present.extent(timeline) {
        Some((count, first, last)) => (count, Some(first), Some(last)),
        None => (0, None, None),
    };
    let name = |segment: Option<u64>| segment.and_then(|s| segment_file_name(timeline, s, segment_size));
    TimelineSummary {
        timeline,
        segments,
        first: name(first),
        last: name(last),
        history: histories.contains_key(&timeline),
    }
}

/// The catalog's backups as segment spans; a record whose start or stop cannot be read is a finding
/// (no recovery can be planned from it).
async fn read_backups(repo: &Repository, segment_size: u32) -> Result<(Vec<BackupSpan>, Vec<Finding>), Error> {
    let (mut spans, mut findings) = (Vec::new(), Vec::new());
    base::for_each_backup(repo, |record| {
        let start = WalFileName::parse(&record.start_wal_file).ok().and_then(|n| n.segment_number(segment_size));
        match (start, parse_lsn(&record.stop_lsn)) {
            (Some(start), Some(stop_lsn)) => spans.push(BackupSpan {
                name: record.name,
                timeline: record.timeline,
                stop_timeline: record.stop_timeline,
                start,
                stop: stop_lsn / u64::from(segment_size),
                stop_lsn,
            }),
            _ => {
                let message = format!(
                    "backup {}: its catalog record's start WAL file {:?} or stop LSN {:?} cannot be read, so its \
                     WAL cannot be found",
                    record.name, record.start_wal_file, record.stop_lsn
                );
                findings.push(Finding::new(FindingKind::IncompleteBackupWal, record.name, message));
            }
        }
        Ok(())
    })
    .await?;
    Ok((spans, findings))
}

/// Whether this host checks an encrypted repository without a key: then only what listings, seals
/// and lengths show is checked.
fn keyless(repo: &Repository) -> bool {
    repo.encryption().is_keyless()
}

/// What a keyless run left unchecked, for the report.
fn without_key_note(repo: &Repository, undecrypted: &BTreeSet<u32>, deep: bool) -> Option<String> {
    if !keyless(repo) {
        return None;
    }
    let headers = if deep { "; --deep checked each object's seal and length, not its page header" } else { "" };
    Some(format!(
        "no identity_files or passphrase_file here: {} encrypted history file(s) not read, so timelines \
         branching off a backup's are not followed{headers}; run wal-verify where a key is for the full check",
        undecrypted.len()
    ))
}

/// Every history file's entries; one that cannot be read or parsed is a finding, by timeline; one
/// that a keyless host cannot decrypt is only noted (third value).
async fn read_histories(repo: &Repository) -> Result<(Histories, BTreeMap<u32, Finding>, BTreeSet<u32>), Error> {
    let (mut histories, mut unreadable, mut undecrypted) = (Histories::new(), BTreeMap::new(), BTreeSet::new());
    for timeline in base::history_timelines(repo).await? {
        match base::read_history(repo, timeline).await {
            Ok(forks) => {
                histories.insert(timeline, forks);
            }
            Err(Error::Encryption { .. }) if keyless(repo) => {
                undecrypted.insert(timeline);
            }
            Err(Error::Corrupt { location, reason }) => {
                let name = coverage::history_name(timeline);
                let finding = Finding::new(FindingKind::HistoryMismatch, name, format!("{location}: {reason}"));
                unreadable.insert(timeline, finding);
            }
            Err(e) => return Err(e),
        }
    }
    Ok((histories, unreadable, undecrypted))
}

fn stale_finding(newest: Option<&(String, SystemTime)>, options: &WalVerifyOptions) -> Option<Finding> {
    let max_age = options.max_age?;
    let limit = human_duration(max_age);
    let Some((name, at)) = newest else {
        let message = format!("no WAL object with a storage time is archived, --max-age {limit}: archiving never ran");
        return Some(Finding::new(FindingKind::StaleArchive, "", message));
    };
    let age = options.now.duration_since(*at).unwrap_or_default();
    (age > max_age).then(|| {
        let message = format!(
            "newest segment {name} archived {} ago, more than --max-age {limit}: archiving has stalled",
            human_duration(age)
        );
        Finding::new(FindingKind::StaleArchive, name.clone(), message)
    })
}

/// `at` in RFC 3339, UTC (`2026-12-01T16:40:23.5Z`), as `--json` gives times.
pub fn rfc3339(at: SystemTime) -> String {
    use time::format_description::well_known::Rfc3339;
    time::OffsetDateTime::from(at).format(&Rfc3339).unwrap_or_default()
}

/// A duration for people: `45s`, `15m`, `2h05m`, `3d4h`.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 if secs.is_multiple_of(60) => format!("{}m", secs / 60),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86_400 if secs.is_multiple_of(3600) => format!("{}h", secs / 3600),
        3600..86_400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

/// What the pass over `wal/` keeps.
#[derive(Debug, Default)]
struct Scan {
    present: SegmentSet,
    /// Per timeline with segments or `.partial` segments, its lowest.
    lowest: BTreeMap<u32, u64>,
    objects: u64,
    segments: u64,
    newest: Option<(String, SystemTime)>,
    deep: Option<DeepReport>,
    damaged: Vec<Finding>,
}

impl Scan {
    /// Takes in one listed object; returns its name when it is a WAL object in its place.
    fn note(&mut self, meta: &ObjectMeta, segment_size: u32, log: &Log) -> Option<WalFileName> {
        let file = meta.key.rsplit('/').next().unwrap_or_default();
        if crate::fs::is_temp_name(file) {
            return None;
        }
        let Some(name) = WalFileName::parse(file).ok().filter(|name| Repository::wal_key(name) == meta.key) else {
            log.debug(format_args!("{}: not a WAL object in its place; not counted", meta.key));
            return None;
        };
        self.objects += 1;
        if let Some(at) = meta.modified
            && self.newest.as_ref().is_none_or(|(_, newest)| at > *newest)
        {
            self.newest = Some((name.to_string(), at));
        }
        if let (true, Some(segment)) = (name.is_segment_data(), name.segment_number(segment_size)) {
            let lowest = self.lowest.entry(name.timeline()).or_insert(segment);
            *lowest = (*lowest).min(segment);
            if name.kind() == WalFileKind::Segment {
                self.segments += 1;
                self.present.insert(name.timeline(), segment);
            }
        }
        Some(name)
    }
}

/// Lists `wal/` page by page, and with `deep` checks each object as it comes, `parallel` at once.
async fn scan(repo: &Repository, options: &WalVerifyOptions, log: &Log, identity: &Identity) -> Result<Scan, Error> {
    let mut scan = Scan { deep: options.deep.then(DeepReport::default), ..Scan::default() };
    let mut checks = tokio::task::JoinSet::new();
    let mut after: Option<String> = None;
    let listing = repo.storage().location(WAL_PREFIX);
    loop {
        let page = retry::with_deadline(options.deadline, log, &listing, || async {
            Ok(repo.storage().list(WAL_PREFIX, after.as_deref(), PAGE).await?)
        })
        .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for meta in &page {
            let Some(name) = scan.note(meta, identity.wal_segment_size, log) else { continue };
            if !options.deep {
                continue;
            }
            while checks.len() >= options.parallel.max(1) {
                let done = checks.join_next().await.expect("not empty");
                scan.checked(done)?;
            }
            let object = Object { repo: repo.clone(), key: meta.key.clone(), name, identity: identity.clone() };
            checks.spawn(object.check(options.deadline, log.clone()));
        }
    }
    while let Some(done) = checks.join_next().await {
        scan.checked(done)?;
    }
    Ok(scan)
}

/// What reading one object showed.
#[derive(Debug)]
enum Checked {
    Good {
        stored: u64,
        original: u64,
    },
    Damaged {
        stored: u64,
        cause: String,
    },
    /// Removed since the listing (a base-expire at work).
    Gone,
}

impl Scan {
    fn checked(&mut self, done: Result<Result<(String, Checked), Error>, tokio::task::JoinError>) -> Result<(), Error> {
        let (key, checked) = match done {
            Ok(result) => result?,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(Error::Internal(format!("an object check was cancelled: {e}"))),
        };
        let deep = self.deep.get_or_insert_with(DeepReport::default);
        match checked {
            Checked::Good { stored, original } => {
                deep.verified_objects += 1;
                deep.stored_bytes += stored;
                deep.original_bytes += original;
            }
            Checked::Damaged { stored, cause } => {
                deep.verified_objects += 1;
                deep.damaged_objects += 1;
                deep.stored_bytes += stored;
                let message = format!("{key}: {cause}");
                self.damaged.push(Finding::new(FindingKind::DamagedObject, key, message));
            }
            Checked::Gone => {}
        }
        Ok(())
    }
}

/// One object to read back.
struct Object {
    repo: Repository,
    key: String,
    name: WalFileName,
    identity: Identity,
}

impl Object {
    /// Reads the object through the codec into a sink that keeps only the page header, within
    /// `deadline` of retries; damage is an answer, a store that keeps failing an error.
    async fn check(self, deadline: Duration, log: Log) -> Result<(String, Checked), Error> {
        let location = self.repo.storage().location(&self.key);
        let checked = retry::with_deadline(deadline, &log, &location, || async {
            let get = async || match self.repo.storage().get(&self.key).await {
                Ok(reader) => Ok(Some(reader)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(Error::from(e)),
            };
            let Some(mut reader) = get().await? else { return Ok(Checked::Gone) };
            if keyless(&self.repo) {
                if let Some(checked) = self.check_seal(reader, &location).await? {
                    return Ok(checked);
                }
                // A plain object: decoded as ever.
                let Some(again) = get().await? else { return Ok(Checked::Gone) };
                reader = again;
            }
            let mut header = Prefix::new(LongPageHeader::LEN);
            match self.repo.reader_pipeline().decode_async(reader, &mut header).await {
                Ok(pumped) => {
                    let (stored, original) = (pumped.stored_bytes, pumped.digest.len);
                    Ok(match self.judge(&header.into_bytes(), original) {
                        None => Checked::Good { stored, original },
                        Some(cause) => Checked::Damaged { stored, cause },
                    })
                }
                // A key problem is not damage: the check cannot be made (exit 14), not a finding.
                Err(PumpError::Format(e)) if e.is_encryption() => Err(Error::stored(&location, e)),
                Err(PumpError::Format(e)) => Ok(Checked::Damaged { stored: 0, cause: e.to_string() }),
                Err(PumpError::Source(e)) => Err(StorageError::io(&location, "read", e).into()),
                Err(PumpError::Codec(e) | PumpError::Sink(e)) => {
                    Err(Error::local_io(std::path::Path::new(&location), "decompress", e))
                }
            }
        })
        .await?;
        Ok((self.key, checked))
    }

    /// Without a key: an encrypted object's seal and recorded length. `None` for a plain object,
    /// decoded as ever (the reader pipeline refuses it unless accept_plain).
    async fn check_seal(&self, reader: crate::storage::ObjectReader, location: &str) -> Result<Option<Checked>, Error> {
        let (digest, stored) = match check_sealed(reader).await {
            Ok(Sealed::Whole { digest, stored }) => (digest, stored),
            Ok(Sealed::Plain) => return Ok(None),
            Err(Ok(e)) => return Err(StorageError::io(location, "read", e).into()),
            Err(Err(e)) => return Ok(Some(Checked::Damaged { stored: 0, cause: e.to_string() })),
        };
        let whole = u64::from(self.identity.wal_segment_size);
        if self.name.kind() == WalFileKind::Segment && digest.len != whole {
            let cause = format!("records {} bytes, not a whole segment of {whole} bytes", digest.len);
            return Ok(Some(Checked::Damaged { stored, cause }));
        }
        Ok(Some(Checked::Good { stored, original: digest.len }))
    }

    /// Why a segment that decoded and matched its checksum is still not the segment its name says:
    /// not a whole segment, not WAL, another segment's or another cluster's.
    fn judge(&self, header: &[u8], original: u64) -> Option<String> {
        if self.name.kind() != WalFileKind::Segment {
            return None;
        }
        let size = self.identity.wal_segment_size;
        if original != u64::from(size) {
            return Some(format!("decodes to {original} bytes, not a whole segment of {size} bytes"));
        }
        let header = match LongPageHeader::parse(header) {
            Ok(header) => header,
            Err(reason) => return Some(reason),
        };
        if let Err(reason) = header.check_matches(&self.name, original) {
            return Some(reason);
        }
        let ours = &self.identity.system_identifier;
        (header.system_identifier.to_string() != *ours).then(|| {
            format!(
                "written by the cluster with system identifier {}, not this repository's {ours}",
                header.system_identifier
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let d = Duration::from_secs;
        assert_eq!(human_duration(d(45)), "45s");
        assert_eq!(human_duration(d(900)), "15m");
        assert_eq!(human_duration(d(905)), "15m05s");
        assert_eq!(human_duration(d(7200)), "2h");
        assert_eq!(human_duration(d(7500)), "2h05m");
        assert_eq!(human_duration(d(3 * 86_400 + 4 * 3600 + 5)), "3d4h");
    }

    fn options(max_age: Option<u64>) -> WalVerifyOptions {
        WalVerifyOptions {
            max_age: max_age.map(Duration::from_secs),
            deep: false,
            parallel: 1,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(10_000),
            deadline: Duration::from_secs(1),
            probe_writes: false,
        }
    }

    #[test]
    fn an_archive_older_than_max_age_is_stale() {
        let newest = ("000000010000000000000005".to_owned(), SystemTime::UNIX_EPOCH + Duration::from_secs(2_800));
        assert_eq!(stale_finding(Some(&newest), &options(None)), None, "no --max-age, no judgement");
        assert_eq!(stale_finding(Some(&newest), &options(Some(7200))), None);
        let stale = stale_finding(Some(&newest), &options(Some(900))).unwrap();
        assert_eq!((stale.kind, stale.subject.as_str()), (FindingKind::StaleArchive, "000000010000000000000005"));
        assert_eq!(
            stale.message,
            "newest segment 000000010000000000000005 archived 2h ago, more than --max-age 15m: archiving has stalled"
        );
        assert!(stale_finding(None, &options(Some(900))).is_some(), "nothing archived at all");
    }
}
