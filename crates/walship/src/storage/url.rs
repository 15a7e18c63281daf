//! Where a repository lives, as one URL: `file://` (or an absolute path), `s3://` or `ssh://`.
//!
//! The URL is a storage notion (which backend, which bucket or host and path), so it lives beside
//! the backends; the configuration only says where the text came from.

use std::path::PathBuf;

/// Where the repository lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoUrl {
    /// A directory on this host (`file:///path` or `/path`).
    Local(PathBuf),
    /// `s3://bucket/prefix`: objects under `prefix/` (no leading or trailing slash; may be empty).
    S3 {
        /// The bucket's name.
        bucket: String,
        /// The key prefix, without leading or trailing `/`.
        prefix: String,
    },
    /// `ssh://[user@]host[:port]/absolute/path`.
    Ssh {
        /// The login user; `None`: ssh's own default.
        user: Option<String>,
        /// The server's host name (or an alias of `~/.ssh/config`).
        host: String,
        /// The port in the URL, which wins over `[ssh] port`.
        port: Option<u16>,
        /// The repository's absolute path on the server.
        path: PathBuf,
    },
}

impl RepoUrl {
    /// Parses `text` as given to `--repo`, `WALSHIP_REPO` or `repo`; the error says what is wrong
    /// without echoing anything that could be a password.
    pub fn parse(text: &str) -> Result<Self, String> {
        let path = if let Some(rest) = text.strip_prefix("file://") {
            rest
        } else if let Some(rest) = text.strip_prefix("s3://") {
            return parse_s3(text, rest);
        } else if let Some(rest) = text.strip_prefix("ssh://") {
            return parse_ssh(text, rest);
        } else if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "unknown repository scheme {scheme:?}; expected file://, s3://, ssh:// or an absolute path"
            ));
        } else {
            text
        };
        if !path.starts_with('/') {
            return Err(format!(
                "repository path {text:?} is not absolute (archive_command runs in the data directory, \
                 so a relative path would land inside it)"
            ));
        }
        if path.split('/').any(|c| c == "..") {
            return Err(format!("repository path {text:?} contains '..'"));
        }
        Ok(RepoUrl::Local(PathBuf::from(path)))
    }
}

fn parse_s3(text: &str, rest: &str) -> Result<RepoUrl, String> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !bucket_ok {
        return Err(format!(
            "{text:?}: bucket name {bucket:?} is not valid (3 to 63 lower-case letters, digits, '-' or '.')"
        ));
    }
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        super::validate_key(prefix).map_err(|reason| format!("{text:?}: prefix: {reason}"))?;
    }
    Ok(RepoUrl::S3 { bucket: bucket.to_owned(), prefix: prefix.to_owned() })
}

fn parse_ssh(text: &str, rest: &str) -> Result<RepoUrl, String> {
    // `user:password@`, which may hold '/': refused before any message could echo the URL into the
    // server log. `host:22/path@x` is a port, not a password.
    let password = rest.split_once('@').and_then(|(before, _)| before.split_once(':')).is_some_and(|(user, after)| {
        let is_port = after.split('/').next().unwrap_or("").bytes().all(|b| b.is_ascii_digit()) && after.contains('/');
        !user.contains('/') && !is_port
    });
    if password {
        return Err("an ssh:// repository URL cannot carry a password (ssh://user@host/path; walship logs in \
                    with keys or the agent)"
            .into());
    }
    let slash = rest.find('/').ok_or_else(|| format!("{text:?}: expected ssh://[user@]host[:port]/absolute/path"))?;
    let (authority, path) = rest.split_at(slash);
    let (user, host_port) = match authority.rsplit_once('@') {
        Some((user, host_port)) => (Some(user.to_owned()), host_port),
        None => (None, authority),
    };
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) => {
            (host, Some(port.parse::<u16>().map_err(|_| format!("{text:?}: port {port:?} is not a number"))?))
        }
        None => (host_port, None),
    };
    let plain = |s: &str| !s.is_empty() && !s.starts_with('-') && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if !plain(host) || user.as_deref().is_some_and(|u| !plain(u)) {
        return Err(format!("{text:?}: the user or host name is empty or not plain (no spaces, no leading '-')"));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(format!("repository path {text:?} contains '..'"));
    }
    Ok(RepoUrl::Ssh { user, host: host.to_owned(), port, path: PathBuf::from(path) })
}

impl std::fmt::Display for RepoUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoUrl::Local(path) => write!(f, "file://{}", path.display()),
            RepoUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            RepoUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            RepoUrl::Ssh { user, host, port, path } => {
                write!(f, "ssh://")?;
                if let Some(user) = user {
                    write!(f, "{user}@")?;
                }
                write!(f, "{host}")?;
                if let Some(port) = port {
                    write!(f, ":{port}")?;
                }
                write!(f, "{}", path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        assert_eq!(
            RepoUrl::parse("s3://my-bucket/some/prefix/").unwrap(),
            RepoUrl::S3 { bucket: "my-bucket".into(), prefix: "some/prefix".into() }
        );
        assert_eq!(RepoUrl::parse("s3://my-bucket").unwrap().to_string(), "s3://my-bucket");
        for bad in ["s3://", "s3://Upper/x", "s3://ab", "s3://b-u-c/../x", "s3://bucket/a//b"] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssh_urls() {
        assert_eq!(
            RepoUrl::parse("ssh://backup@db-archive:2222/srv/walship").unwrap(),
            RepoUrl::Ssh {
                user: Some("backup".into()),
                host: "db-archive".into(),
                port: Some(2222),
                path: "/srv/walship".into()
            }
        );
        assert_eq!(RepoUrl::parse("ssh://host/srv/w").unwrap().to_string(), "ssh://host/srv/w");
        for bad in ["ssh://host", "ssh://host:x/p", "ssh://-oProxyCommand=x/p", "ssh://a b/p", "ssh://h/a/../b"] {
            assert!(RepoUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
