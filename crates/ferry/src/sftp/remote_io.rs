//! Reading from the server and asking it to hash: what uploads, downloads
//! and the proofs of [`super::remote_hash`] share. A leaf of `sftp/`.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{Packet, StatusCode};
use tokio::task::JoinSet;
use tracing::warn;

use super::auth::Conn;
use super::sftp_err;
use super::sidecar::{self, RANGE_SIZE};
use crate::error::{Error, Result};

/// Requests in flight per range (OpenSSH's sftp keeps 64).
pub(crate) const WINDOW: usize = 64;

pub(crate) fn range_count(size: u64) -> u64 {
    size.div_ceil(RANGE_SIZE)
}

pub(crate) fn range_len(size: u64, i: u64) -> u64 {
    RANGE_SIZE.min(size - i * RANGE_SIZE)
}

/// A range's bytes as consecutive pieces, one per SFTP request, so that
/// nothing is copied to put them together or split them up again.
#[derive(Debug, Default)]
pub(crate) struct Pieces(pub(crate) Vec<Vec<u8>>);

impl Pieces {
    pub fn len(&self) -> u64 {
        self.0.iter().map(|p| p.len() as u64).sum()
    }

    /// [`sidecar::range_digest`] of range `i` of a file of `size` bytes.
    pub fn digest(&self, size: u64, i: u64) -> String {
        sidecar::range_digest_of_pieces(size, i, self.0.iter().map(|p| p.as_slice()))
    }

    /// Writes the pieces to `f` from `off` on.
    pub fn write_at(&self, f: &std::fs::File, mut off: u64) -> std::io::Result<()> {
        for p in &self.0 {
            f.write_all_at(p, off)?;
            off += p.len() as u64;
        }
        Ok(())
    }

    pub(crate) fn into_inner(self) -> Vec<Vec<u8>> {
        self.0
    }
}

/// Reads `len` bytes at `off` of an open remote file, many requests in flight.
pub(crate) async fn read_remote(
    c: &Conn,
    handle: &str,
    off: u64,
    len: u64,
    what: &str,
    host: &str,
) -> Result<Pieces> {
    read_remote_owned(
        c.raw.clone(),
        c.block,
        handle.to_string(),
        off,
        len,
        what.to_string(),
        host.to_string(),
    )
    .await
}

/// [`read_remote`] on owned arguments, to run as a task of its own (reading
/// the next range while this one is written). Stops at the end of the file:
/// the pieces may cover less than `len`.
pub(crate) async fn read_remote_owned(
    raw: Arc<RawSftpSession>,
    block: u32,
    handle: String,
    off: u64,
    len: u64,
    what: String,
    host: String,
) -> Result<Pieces> {
    let (handle, what, host) = (handle.as_str(), what.as_str(), host.as_str());
    let block = u64::from(block.max(1));
    let mut pieces: Vec<Vec<u8>> = vec![Vec::new(); len.div_ceil(block) as usize];
    let mut set: JoinSet<std::result::Result<(usize, Vec<u8>), russh_sftp::client::error::Error>> =
        JoinSet::new();
    let mut pos = 0u64;
    loop {
        while pos < len && set.len() < WINDOW {
            let (raw, h) = (raw.clone(), handle.to_string());
            let (at, want) = (pos, block.min(len - pos));
            let k = (pos / block) as usize;
            set.spawn(async move {
                // Servers may return short reads: ask again for the rest.
                let mut out: Vec<u8> = Vec::new();
                while (out.len() as u64) < want {
                    let left = (want - out.len() as u64) as u32;
                    match raw.read(h.clone(), off + at + out.len() as u64, left).await {
                        Ok(d) if d.data.is_empty() => break,
                        // The whole piece in one answer: keep its buffer as is.
                        Ok(d) if out.is_empty() && d.data.len() == left as usize => out = d.data,
                        Ok(d) => out.extend_from_slice(&d.data[..d.data.len().min(left as usize)]),
                        Err(russh_sftp::client::error::Error::Status(s))
                            if s.status_code == StatusCode::Eof =>
                        {
                            break
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok((k, out))
            });
            pos += want;
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let (k, data) = r
            .map_err(|e| Error::Ssh {
                host: host.into(),
                msg: e.to_string(),
            })?
            .map_err(|e| sftp_err("read", what, host, e))?;
        pieces[k] = data;
    }
    // Pieces after a short one (the end of the file) do not follow on from it.
    if let Some(short) = pieces.iter().position(|p| (p.len() as u64) < block) {
        pieces.truncate(short + 1);
    }
    Ok(Pieces(pieces))
}

pub(crate) fn sftp_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Hash algorithms asked of `check-file-handle`, best first. MD5 and SHA-1
/// are left out on purpose: they would be a weaker check than reading back.
const CHECK_FILE_ALGS: &str = "sha256,sha512";

/// Asks the server to hash `len` bytes at `off` of the open file `handle`
/// with the `check-file-handle` extension (draft-ietf-secsh-filexfer-extensions-00,
/// section 3): one digest over the whole range (block size 0). Returns the
/// algorithm and digest, or `None` when the server declines or answers in a
/// way we cannot use (the caller then reads back instead). OpenSSH's
/// sftp-server does not implement this extension (as of 9.x it announces
/// only `*@openssh.com` ones); ProFTPD's mod_sftp, Apache MINA SSHD and
/// some commercial servers do.
pub(crate) async fn server_hash(
    c: &Conn,
    handle: &str,
    off: u64,
    len: u64,
    what: &str,
    host: &str,
) -> Result<Option<(&'static str, Vec<u8>)>> {
    let mut data = Vec::new();
    sftp_string(&mut data, handle);
    sftp_string(&mut data, CHECK_FILE_ALGS);
    data.extend_from_slice(&off.to_be_bytes());
    data.extend_from_slice(&len.to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    let reply = match c.raw.extended("check-file-handle", data).await {
        Ok(Packet::ExtendedReply(r)) => r.data,
        Ok(Packet::Status(s)) => {
            warn!(%host, status = %s.status_code, msg = %s.error_message, "check-file-handle refused; reading back instead");
            return Ok(None);
        }
        Ok(_) => return Ok(None),
        Err(russh_sftp::client::error::Error::Status(s)) => {
            warn!(%host, status = %s.status_code, msg = %s.error_message, "check-file-handle refused; reading back instead");
            return Ok(None);
        }
        Err(e) => return Err(sftp_err("check-file-handle", what, host, e)),
    };
    Ok(parse_check_file_reply(&reply))
}

/// `string "check-file", string hash-algorithm, byte[] hash`: the algorithm
/// (one we asked for) and a digest of its length, else `None`.
pub(crate) fn parse_check_file_reply(mut b: &[u8]) -> Option<(&'static str, Vec<u8>)> {
    let mut string = || -> Option<Vec<u8>> {
        let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let s = b.get(4..4 + n)?.to_vec();
        b = &b[4 + n..];
        Some(s)
    };
    if !string()?.eq_ignore_ascii_case(b"check-file") {
        return None;
    }
    let alg = string()?;
    let (alg, len) = match alg.as_slice() {
        b"sha256" => ("sha256", 32),
        b"sha512" => ("sha512", 64),
        _ => return None,
    };
    (b.len() == len).then(|| (alg, b.to_vec()))
}
