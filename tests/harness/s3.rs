//! A real S3-compatible server for tests: s3s-fs (pinned to 0.14.1 by `scripts/install-deps.sh`), which
//! checks request signatures and honours `If-None-Match`, started on 127.0.0.1 and killed on drop.
//!
//! s3s-fs keeps each object as a plain file under `<root>/<bucket>/<key>` (metadata beside it in hidden
//! JSON files), so tests can damage objects directly and inspect what an upload left behind.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Scratch, chown_to_server_user};

pub const ACCESS_KEY: &str = "walship-test-key";
pub const SECRET_KEY: &str = "walship-test-secret";
pub const REGION: &str = "us-east-1";

/// The s3s-fs binary: `$WALSHIP_S3S_FS`, else cargo's install directory, else the PATH.
pub fn s3s_fs_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WALSHIP_S3S_FS") {
        return PathBuf::from(path);
    }
    let cargo_home =
        std::env::var_os("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("HOME")).join(".cargo"));
    let installed = cargo_home.join("bin/s3s-fs");
    if installed.exists() { installed } else { PathBuf::from("s3s-fs") }
}

pub struct S3Server {
    child: Option<Child>,
    port: u16,
    /// Where s3s-fs keeps buckets and objects.
    root: Scratch,
}

impl S3Server {
    /// Starts a server with an empty root.
    pub fn start() -> S3Server {
        let root = Scratch::new("s3");
        let mut server = S3Server { child: None, port: 0, root };
        server.restart();
        server
    }

    /// Starts (again) on a fresh port, keeping the stored objects.
    pub fn restart(&mut self) {
        self.kill();
        let port = free_port();
        let log = fs::File::create(self.root.path().join("s3s-fs.log")).unwrap();
        let data = self.data_dir();
        fs::create_dir_all(&data).unwrap();
        let child = Command::new(s3s_fs_binary())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start s3s-fs ({:?}): {e}; scripts/install-deps.sh installs it", s3s_fs_binary())
            });
        self.child = Some(child);
        self.port = port;
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "s3s-fs did not listen on {port}: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The directory holding buckets (one subdirectory each).
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// Creates a bucket (s3s-fs keeps one as a directory).
    pub fn create_bucket(&self, bucket: &str) {
        fs::create_dir_all(self.data_dir().join(bucket)).unwrap();
    }

    /// The file in which s3s-fs keeps `key` of `bucket`.
    pub fn object_file(&self, bucket: &str, key: &str) -> PathBuf {
        self.data_dir().join(bucket).join(key)
    }

    /// The hidden file in which s3s-fs keeps `key`'s metadata (user metadata such as walship's
    /// `walship-sha256`): `<root>/.bucket-<b64 bucket>.object-<b64 key>.metadata.json`, base64 URL-safe
    /// without padding.
    pub fn metadata_file(&self, bucket: &str, key: &str) -> PathBuf {
        self.data_dir().join(format!(".bucket-{}.object-{}.metadata.json", base64_url(bucket), base64_url(key)))
    }

    /// What in-progress or abandoned multipart uploads left in the data directory. s3s-fs 0.14.1 keeps
    /// them in its root, not under the bucket: `.upload-<id>.json` (the upload), `.upload_id-<id>.part-<n>`
    /// (each part's bytes) and `.bucket-...object-....upload-<id>.metadata.json` (the object's metadata
    /// until completion). CompleteMultipartUpload and AbortMultipartUpload remove all three.
    pub fn multipart_leftovers(&self) -> Vec<String> {
        let Ok(entries) = fs::read_dir(self.data_dir()) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload-") || n.starts_with(".upload_id-") || n.contains(".upload-"))
            .collect();
        names.sort();
        names
    }

    /// The parts (`.upload_id-<id>.part-<n>`) currently stored for unfinished multipart uploads.
    pub fn stored_parts(&self) -> Vec<String> {
        self.multipart_leftovers().into_iter().filter(|n| n.starts_with(".upload_id-")).collect()
    }

    /// Every object key in `bucket` (files below its directory), sorted.
    pub fn object_keys(&self, bucket: &str) -> Vec<String> {
        crate::assertions::files_below(&self.data_dir().join(bucket))
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.root.path().join("s3s-fs.log")).unwrap_or_default()
    }

    /// The text of a walship configuration for `repo` (an `s3://` URL) on this server, through
    /// `endpoint` (this server's, or a proxy in front of it), with `extra` lines added to `[s3]`.
    pub fn config_text(&self, repo: &str, endpoint: &str, top: &str, extra_s3: &str) -> String {
        format!(
            "repo = \"{repo}\"\n{top}\n[s3]\nendpoint = \"{endpoint}\"\nregion = \"{REGION}\"\n\
             force_path_style = true\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n\
             {extra_s3}\n"
        )
    }

    /// Writes a configuration file for `repo` on this server into `dir`, readable by the server user.
    pub fn write_config(&self, dir: &Path, repo: &str) -> PathBuf {
        write_config_file(dir, "walship.toml", &self.config_text(repo, &self.endpoint(), "", ""))
    }
}

/// Writes `text` to `dir/name`, owned by the server user, and returns its path.
pub fn write_config_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    chown_to_server_user(&path);
    path
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Asserts that no multipart upload, finished or not, left anything in `server`'s data directory.
#[track_caller]
pub fn assert_no_multipart_leftovers(server: &S3Server, what: &str) {
    let left = server.multipart_leftovers();
    assert!(left.is_empty(), "{what}: multipart upload files left in {:?}: {left:?}", server.data_dir());
}

/// Base64, URL-safe alphabet, no padding (how s3s-fs names metadata files).
fn base64_url(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
