//! Running wal-verify the way cron does and reading what it says: its exit code, its `--json`
//! report, its `--metrics` file. Every run goes through [`wal_verify`], which also proves that the
//! run left the repository byte for byte as it found it (every file, hidden ones included, with its
//! size and SHA-256, before and after).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use walship::codec::ContentDigest;

use crate::backups::base_command;
use crate::repository::{Backend, ConfigLines, Repository};
use crate::{Output, Scratch, run};

/// A repository of kind `backend`, the configuration file that names it, and the scratch
/// directory commands run in (it also holds the metrics files).
pub struct VerifySetup {
    /// The scratch directory.
    pub store: Scratch,
    /// The repository.
    pub repo: Repository,
    /// `--config FILE`, selecting the repository.
    pub repo_args: Vec<OsString>,
}

impl VerifySetup {
    /// A new repository for `scenario` on `backend`.
    pub fn new(backend: Backend, scenario: &str) -> VerifySetup {
        let store = Scratch::new(&format!("walverify-{scenario}-{}", backend.label()));
        let repo = Repository::new(backend, &store);
        let config = repo.write_config(store.path(), "verify.toml", ConfigLines::default());
        VerifySetup { repo_args: vec!["--config".into(), config.into()], store, repo }
    }

    /// Runs wal-verify with `args` on this repository; see [`wal_verify`].
    #[track_caller]
    pub fn verify(&self, args: &[&str]) -> Output {
        wal_verify(&self.repo, &self.repo_args, self.store.path(), args)
    }

    /// Runs wal-verify with `args` and `--json`, expects exit `code`, and returns the report.
    #[track_caller]
    pub fn report(&self, args: &[&str], code: i32) -> serde_json::Value {
        let out = self.verify(&[args, &["--json"]].concat());
        assert_eq!(out.code, Some(code), "wal-verify {args:?}: {out:#?}");
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("wal-verify --json: {e}: {out:#?}"))
    }

    /// Where a metrics file called `name` goes.
    pub fn metrics_path(&self, name: &str) -> PathBuf {
        self.store.path().join(name)
    }
}

/// Every file of `repo` (hidden ones too: a temporary file left would show), with its size and
/// SHA-256.
pub fn snapshot(repo: &Repository) -> BTreeMap<String, (u64, String)> {
    repo.files_under("")
        .into_iter()
        .map(|key| {
            let digest = ContentDigest::of_file(&repo.object_file(&key)).unwrap_or_else(|e| panic!("{key}: {e}"));
            (key, (digest.len, digest.sha256_hex()))
        })
        .collect()
}

/// Runs wal-verify with `repo_args` and `args` from `cwd`, and checks that the repository is
/// unchanged by it.
#[track_caller]
pub fn wal_verify(repo: &Repository, repo_args: &[OsString], cwd: &Path, args: &[&str]) -> Output {
    let before = snapshot(repo);
    let mut cmd = base_command("wal-verify", repo_args, cwd);
    let out = run(cmd.args(args));
    let after = snapshot(repo);
    assert!(before == after, "wal-verify {args:?} changed the repository:\nbefore {before:#?}\nafter {after:#?}");
    out
}

/// The findings of `kind` in a report.
pub fn findings(report: &serde_json::Value, kind: &str) -> Vec<serde_json::Value> {
    let all = report["findings"].as_array().unwrap_or_else(|| panic!("findings in {report:#}"));
    all.iter().filter(|f| f["kind"] == kind).cloned().collect()
}

/// A Prometheus text file as `name{labels}` -> value; panics on a line that is not a comment or a
/// sample, and on a sample whose metric has no `# HELP` and `# TYPE` before it.
#[track_caller]
pub fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    let mut described = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
            described.push(rest.split(' ').next().unwrap_or_default().to_owned());
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let name = series.split('{').next().unwrap_or_default();
        assert_eq!(described.iter().filter(|d| *d == name).count(), 2, "{name} lacks HELP or TYPE: {text}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("not a number in {line:?}"));
        samples.insert(series.to_owned(), value);
    }
    samples
}

/// The value of the sample of `name` whose labels include every `label="value"` of `labels`.
#[track_caller]
pub fn metric(samples: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(series, _)| series.split('{').next() == Some(name) && labels.iter().all(|l| series.contains(l)))
        .map(|(_, value)| *value)
        .collect();
    assert_eq!(found.len(), 1, "one sample of {name} {labels:?} in {samples:#?}");
    found[0]
}

/// Flips one bit in the middle of the file `path`, keeping its length and times' meaning (an object
/// damaged at rest).
pub fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(path, &bytes).unwrap();
}

/// Moves the stored object `key` out of the repository into `aside` (a directory), and returns
/// where it went, for [`put_back`].
pub fn move_aside(repo: &Repository, key: &str, aside: &Path) -> PathBuf {
    let to = aside.join(key.replace('/', "_"));
    std::fs::rename(repo.object_file(key), &to).unwrap_or_else(|e| panic!("move {key} aside: {e}"));
    to
}

/// Puts an object [`move_aside`] moved back under `key`.
pub fn put_back(repo: &Repository, key: &str, from: &Path) {
    std::fs::rename(from, repo.object_file(key)).unwrap_or_else(|e| panic!("put {key} back: {e}"));
}
