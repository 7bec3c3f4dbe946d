//! `ferry cp` to and from SFTP servers (OpenSSH and others): resumable,
//! verified uploads and downloads.
//!
//! * [`auth`]: SSH connection, host keys, keys and agent.
//! * [`sidecar`]: the local record of unfinished transfers (in the state store).
//! * [`upload`]: `PATH.part` on the server, proven prefix, checkpointed ranges, rename.
//! * [`download`]: local `.NAME.ferry.part`, checkpointed ranges, atomic rename.
//! * [`remote_hash`]: the server hashes ranges (check-file, or b3sum/sha256sum over exec).
//!
//! Resume design: a file is cut into fixed ranges ([`sidecar::RANGE_SIZE`]);
//! once a range is written and flushed on the receiving side its BLAKE3
//! digest is recorded. A resume first checks the source against the record
//! (size, mtime, identity, tail digest per [`Verify`]), then proves the kept
//! ranges of the partial (all of them by default, hashed by the server where
//! it can, see [`remote_hash`]; only the last with `--verify tail`) and
//! rewrites from the first range that does not verify.

pub mod auth;
pub mod download;
pub mod listing;
pub mod remote_hash;
pub(crate) mod remote_io;
pub mod sidecar;
pub mod upload;

use std::path::PathBuf;

use crate::error::{Error, Result};

pub use auth::{PassphrasePrompt, SshConfig};

/// How strictly a resume and a finished transfer are verified.
///
/// The default, [`Verify::Full`], proves every byte: the bytes kept from an
/// earlier run before anything is appended to them, and every byte of the
/// finished file before it is renamed into place. The weaker levels are
/// opt-ins that trade proof for speed; each says what it does not check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Verify {
    /// Only the source's size is compared on resume, and the finished file's
    /// size. Does not check any byte, nor whether the source was rewritten.
    Size,
    /// Size and modification time. Does not check any byte, nor a source
    /// rewritten with its old mtime put back.
    Mtime,
    /// Size, mtime, the source's identity (ctime, inode) and a digest of its
    /// last 64 KiB; the last recorded range of the partial is read back
    /// before appending, and the last range of the finished file before the
    /// rename. Does not check the earlier kept ranges nor the earlier new
    /// ones: damage there goes unnoticed.
    Tail,
    /// As `tail`, plus every kept range is proven before appending and every
    /// range of the finished file before the rename: hashed by the server
    /// where it can (`check-file-handle`, or `b3sum`, `openssl dgst -sha256`,
    /// `sha256sum` or `shasum` over an SSH exec channel) and compared with the same hash of the local
    /// copy, otherwise read back. For downloads the local part is re-hashed
    /// and, where the server hashes, the remote source's kept ranges are
    /// proven unchanged. The default: named `full` because that is the
    /// guarantee; how it was met is reported per file ([`VerifiedBy`]).
    #[default]
    Full,
}

impl std::str::FromStr for Verify {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "size" => Verify::Size,
            "mtime" => Verify::Mtime,
            "tail" => Verify::Tail,
            "full" => Verify::Full,
            _ => {
                return Err(Error::Usage(format!(
                    "--verify {s}: expected size, mtime, tail or full"
                )))
            }
        })
    }
}

/// `sftp://[USER@]HOST[:PORT]/PATH`. The path is taken as given: relative to
/// the login directory, or absolute with a second slash (`sftp://h//tmp/x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftpTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl SftpTarget {
    /// Parses `s`; an address without `USER@` logs in as `root`.
    pub fn parse(s: &str) -> Result<SftpTarget> {
        Self::parse_with_user(s, "root")
    }

    /// Parses `s`; an address without `USER@` logs in as `default_user`.
    pub fn parse_with_user(s: &str, default_user: &str) -> Result<SftpTarget> {
        let rest = s
            .strip_prefix("sftp://")
            .ok_or_else(|| Error::Usage(format!("{s}: not an sftp:// URL")))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (user, hostport) = match authority.rfind('@') {
            Some(i) => (authority[..i].to_string(), &authority[i + 1..]),
            None => (default_user.to_string(), authority),
        };
        let (host, port) = crate::hostport::parse(hostport, 22)
            .map_err(|why| Error::Usage(format!("{s}: {why}")))?;
        if host.is_empty() || user.is_empty() {
            return Err(Error::Usage(format!("{s}: missing host or user")));
        }
        Ok(SftpTarget {
            user,
            host,
            port,
            path: path.to_string(),
        })
    }

    pub fn hostport(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("sftp://{}@{}/{}", self.user, self.hostport(), path)
    }

    pub(crate) fn with_path(&self, path: String) -> SftpTarget {
        SftpTarget {
            path,
            ..self.clone()
        }
    }
}

/// Options of an SFTP copy beyond the common [`crate::copy::CopyOptions`].
#[derive(Debug, Clone, Default)]
pub struct SftpOptions {
    pub ssh: SshConfig,
    pub verify: Verify,
    /// For tests: fail (as a crash would, without cleanup) once this many
    /// ranges of an upload or download have been checkpointed.
    #[doc(hidden)]
    pub stop_after_ranges: Option<usize>,
}

pub(crate) fn sftp_err(
    op: &'static str,
    path: &str,
    host: &str,
    e: russh_sftp::client::error::Error,
) -> Error {
    use russh_sftp::client::error::Error as E;
    match e {
        E::Status(s) => Error::SftpStatus {
            op,
            path: path.to_string(),
            code: s.status_code as u32,
            msg: format!("{} ({})", s.error_message, s.status_code),
        },
        e => Error::Ssh {
            host: host.to_string(),
            msg: format!("{op} {path}: {e}"),
        },
    }
}

pub(crate) fn is_no_such_file(e: &russh_sftp::client::error::Error) -> bool {
    matches!(e, russh_sftp::client::error::Error::Status(s)
        if s.status_code == russh_sftp::protocol::StatusCode::NoSuchFile)
}

/// What happened to one file, for the summary and the output.
#[derive(Debug)]
pub struct FileOutcome {
    pub digest: Option<blake3::Hash>,
    pub notes: Vec<String>,
    pub resume: Resume,
    pub verified_by: VerifiedBy,
}

pub use crate::report::{FileReport, RestartReason, Resume, VerifiedBy};

/// One file to move.
#[derive(Debug, Clone)]
pub struct Job {
    pub local: PathBuf,
    pub remote: SftpTarget,
    pub size: u64,
}

/// The directory holding a remote path, if the path names one (`None` for
/// a bare name: it goes in the login directory, which exists).
pub(crate) fn remote_parent(path: &str) -> Option<String> {
    let p = path.trim_end_matches('/');
    let i = p.rfind('/')?;
    Some(if i == 0 {
        "/".into()
    } else {
        p[..i].to_string()
    })
}

/// Creates a remote directory and its missing parents (`mkdir -p`); one
/// that exists already, or that appears meanwhile, is fine.
pub(crate) async fn mkdir_p(c: &auth::Conn, t: &SftpTarget) -> Result<()> {
    let host = t.hostport();
    let is_dir = |a: &russh_sftp::protocol::FileAttributes| {
        a.permissions.is_some_and(|p| p & 0o170000 == 0o040000)
    };
    match c.raw.stat(t.path.clone()).await {
        Ok(a) if is_dir(&a.attrs) => return Ok(()),
        Ok(_) => {}
        Err(e) if is_no_such_file(&e) => {}
        Err(e) => return Err(sftp_err("stat", &t.path, &host, e)),
    }
    let mut prefix = if t.path.starts_with('/') {
        "/".to_string()
    } else {
        String::new()
    };
    for part in t.path.split('/').filter(|p| !p.is_empty()) {
        prefix = crate::walk::join(&prefix, part);
        match c.raw.stat(prefix.clone()).await {
            Ok(a) if is_dir(&a.attrs) => continue,
            Ok(_) => {
                return Err(Error::Usage(format!(
                    "{}: exists and is not a directory",
                    t.url(&prefix)
                )))
            }
            Err(e) if is_no_such_file(&e) => {}
            Err(e) => return Err(sftp_err("stat", &prefix, &host, e)),
        }
        if let Err(e) = c
            .raw
            .mkdir(
                prefix.clone(),
                russh_sftp::protocol::FileAttributes::default(),
            )
            .await
        {
            // Made by someone else meanwhile?
            match c.raw.stat(prefix.clone()).await {
                Ok(a) if is_dir(&a.attrs) => {}
                _ => return Err(sftp_err("mkdir", &prefix, &host, e)),
            }
        }
    }
    Ok(())
}

/// After a write, close or fsync came back with a plain `SSH_FX_FAILURE`:
/// asks the server how much space is left (`statvfs@openssh.com`) and, if
/// its file system is (nearly) full, says so. `need` is the file's size.
pub(crate) async fn explain_failure(c: &auth::Conn, t: &SftpTarget, need: u64, e: Error) -> Error {
    if !matches!(e, Error::SftpStatus { code: 4, .. }) || !c.has("statvfs@openssh.com") {
        return e;
    }
    let dir = remote_parent(&t.path).unwrap_or_else(|| ".".into());
    let Ok(v) = c.raw.statvfs(dir).await else {
        return e;
    };
    let avail = v.blocks_avail.saturating_mul(v.fragment_size.max(1));
    // Nearly full: less left than the file needs, and under 16 MiB.
    if avail < need.clamp(4096, NEARLY_FULL) {
        return Error::NoSpace {
            host: t.hostport(),
            path: t.path.clone(),
            avail,
        };
    }
    e
}

/// Free space under which a failed write is put down to a full disk.
const NEARLY_FULL: u64 = 16 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let t = SftpTarget::parse("sftp://bob@h:2222/a/b").unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port, t.path.as_str()),
            ("bob", "h", 2222, "a/b")
        );
        let t = SftpTarget::parse("sftp://bob@h//tmp/x").unwrap();
        assert_eq!((t.port, t.path.as_str()), (22, "/tmp/x"));
        let t = SftpTarget::parse("sftp://bob@[::1]:22/x").unwrap();
        assert_eq!(t.host, "::1");
        assert_eq!(t.hostport(), "[::1]:22");
        assert!(SftpTarget::parse("sftp://bob@h:xx/x").is_err());
        for bad in [
            "sftp://bob@h:0/x",
            "sftp://bob@h:65536/x",
            "sftp://bob@[::1/x",
        ] {
            let e = SftpTarget::parse(bad).unwrap_err();
            assert_eq!(e.class(), crate::ErrorClass::Usage, "{bad}: {e}");
        }
        assert!(SftpTarget::parse("sftp:///x").is_err());
        // Without USER@: the caller's default, never the environment.
        let t = SftpTarget::parse_with_user("sftp://h/x", "carol").unwrap();
        assert_eq!((t.user.as_str(), t.path.as_str()), ("carol", "x"));
        assert_eq!(SftpTarget::parse("sftp://h/x").unwrap().user, "root");
        assert_eq!("full".parse::<Verify>().unwrap(), Verify::Full);
        assert!("nope".parse::<Verify>().is_err());
    }
}
