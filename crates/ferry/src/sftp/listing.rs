//! Listing a remote tree for an SFTP download, with the policy of
//! [`crate::walk`]: a symlink inside the tree is skipped with a warning, or
//! followed with `-L` unless it leads to a directory on the current path (a
//! loop) or one listed already (compared by the server's `realpath`); a
//! dangling link is skipped with a warning. A name that cannot be carried
//! (russh-sftp turns bytes that are not UTF-8 into U+FFFD, so a name holding
//! U+FFFD is taken as one) or that is unsafe to create locally fails that
//! entry loudly, and the rest goes on.

use std::collections::HashSet;

use russh_sftp::client::error::Error as SftpError;
use russh_sftp::protocol::{FileAttributes, StatusCode};
use tracing::{error, warn};

use super::auth::Conn;
use super::{is_no_such_file, sftp_err, SftpTarget};
use crate::error::{Error, Result};
use crate::walk::WalkOptions;

/// Bound on a remote tree listing.
const MAX_ENTRIES: usize = 1_000_000;

/// What a listed entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    Dir,
    File { size: u64 },
}

/// A remote source: what to fetch (paths relative to it, `""` for the
/// source itself; directories before what they hold), and what was left out.
#[derive(Debug, Default)]
pub struct Listing {
    pub items: Vec<(String, Listed)>,
    /// One line per symlink or special file left out on purpose.
    pub skipped: Vec<String>,
    /// One line per entry that could not be copied.
    pub failed: Vec<String>,
}

const S_IFMT: u32 = 0o170000;
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// The `st_mode` file type of attributes (russh-sftp's `is_regular` also
/// says yes to symlinks and sockets, whose type bits include the regular
/// file's).
fn file_type(a: &FileAttributes) -> Option<u32> {
    a.permissions.map(|p| p & S_IFMT)
}

/// A directory waiting to be listed.
struct Frame {
    rel: String,
    /// Its canonical path on the server (for loop detection with `-L`).
    real: String,
    /// Canonical paths of the directories that hold it.
    ancestors: Vec<String>,
}

/// Lists the source `t` (see the module documentation).
pub async fn list(c: &Conn, t: &SftpTarget, opts: WalkOptions) -> Result<Listing> {
    let host = t.hostport();
    // Named as the source: followed, as for local sources.
    let a = c.raw.stat(t.path.clone()).await.map_err(|e| {
        if is_no_such_file(&e) {
            Error::NotFound(format!("{}: no such file or directory", t.url(&t.path)))
        } else {
            sftp_err("stat", &t.path, &host, e)
        }
    })?;
    let mut out = Listing::default();
    if file_type(&a.attrs) != Some(S_IFDIR) {
        out.items.push((
            String::new(),
            Listed::File {
                size: a.attrs.len(),
            },
        ));
        return Ok(out);
    }
    if !opts.recursive {
        return Err(Error::Usage(format!(
            "{} is a directory (use -r)",
            t.url(&t.path)
        )));
    }
    let real = if opts.follow_links {
        realpath(c, &t.path, &host).await?
    } else {
        String::new()
    };
    let top = real.clone();
    let mut visited: HashSet<String> = HashSet::from([real.clone()]);
    out.items.push((String::new(), Listed::Dir));
    let mut stack = vec![Frame {
        rel: String::new(),
        real,
        ancestors: Vec::new(),
    }];
    while let Some(f) = stack.pop() {
        let dir = path_of(t, &f.rel);
        let names = match read_dir(c, &dir, &host, out.items.len()).await {
            Ok(n) => n,
            Err(e) if f.rel.is_empty() => return Err(e),
            Err(Error::SftpStatus { msg, .. }) => {
                fail(
                    &mut out,
                    format!(
                        "{} (and all it holds): not copied: cannot read the directory: {msg}",
                        t.url(&dir)
                    ),
                );
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut ancestors = f.ancestors.clone();
        ancestors.push(f.real.clone());
        let mut subdirs = Vec::new();
        for (name, attrs) in names {
            let rel = crate::walk::join(&f.rel, &name);
            let path = path_of(t, &rel);
            let url = t.url(&path);
            if name.contains('/') || name.contains('\0') {
                fail(
                    &mut out,
                    format!("{url}: not copied: the server listed an unsafe name"),
                );
                continue;
            }
            let mut ty = file_type(&attrs);
            let mut size = attrs.len();
            if ty == Some(S_IFLNK) && !opts.follow_links {
                skip(
                    &mut out,
                    format!("skipping symlink {url} (use -L to follow links)"),
                );
                continue;
            }
            // Before a link is followed: its lossy name leads nowhere.
            if name.contains('\u{fffd}') && matches!(ty, Some(S_IFDIR | S_IFREG | S_IFLNK)) {
                fail(
                    &mut out,
                    format!(
                        "{url}: not copied: the name is not valid UTF-8 (shown with U+FFFD), which ferry cannot carry (rename it there)"
                    ),
                );
                continue;
            }
            if ty == Some(S_IFLNK) {
                match c.raw.stat(path.clone()).await {
                    Ok(a) => {
                        ty = file_type(&a.attrs);
                        size = a.attrs.len();
                    }
                    Err(e) if dangling(&e) => {
                        skip(
                            &mut out,
                            format!("skipping symlink {url}: it leads nowhere"),
                        );
                        continue;
                    }
                    Err(e) => return Err(sftp_err("stat", &path, &host, e)),
                }
            }
            if crate::fsutil::is_part_name(&name) {
                skip(
                    &mut out,
                    format!("skipping {url}: named like a ferry partial file"),
                );
                continue;
            }
            match ty {
                Some(S_IFREG) => out.items.push((rel, Listed::File { size })),
                Some(S_IFDIR) => {
                    let was_link = file_type(&attrs) == Some(S_IFLNK);
                    let real = if !opts.follow_links {
                        String::new()
                    } else if was_link {
                        realpath(c, &path, &host).await?
                    } else {
                        crate::walk::join(&f.real, &name)
                    };
                    if opts.follow_links && (ancestors.contains(&real) || holds(&real, &top)) {
                        skip(
                            &mut out,
                            format!("skipping symlink {url}: it leads back to a directory that holds it (a loop)"),
                        );
                        continue;
                    }
                    if opts.follow_links && !visited.insert(real.clone()) && was_link {
                        skip(
                            &mut out,
                            format!(
                                "skipping symlink {url}: it leads to a directory copied already"
                            ),
                        );
                        continue;
                    }
                    subdirs.push(Frame {
                        rel,
                        real,
                        ancestors: ancestors.clone(),
                    });
                }
                _ => skip(
                    &mut out,
                    format!("skipping {url}: not a regular file or directory"),
                ),
            }
        }
        // Each directory is listed before what it holds; reversed, so the
        // stack yields them in name order.
        for s in subdirs.iter() {
            out.items.push((s.rel.clone(), Listed::Dir));
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out)
}

/// Whether the directory `dir` holds `path` (both canonical).
fn holds(dir: &str, path: &str) -> bool {
    dir == "/"
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn fail(out: &mut Listing, line: String) {
    error!("{line}");
    out.failed.push(line);
}

fn skip(out: &mut Listing, line: String) {
    warn!("{line}");
    out.skipped.push(line);
}

/// A symlink's `stat` failed because it leads nowhere (or nowhere we may go).
fn dangling(e: &SftpError) -> bool {
    matches!(e, SftpError::Status(s)
        if matches!(s.status_code, StatusCode::NoSuchFile | StatusCode::PermissionDenied))
}

fn path_of(t: &SftpTarget, rel: &str) -> String {
    if rel.is_empty() {
        t.path.clone()
    } else {
        format!("{}/{rel}", t.path.trim_end_matches('/'))
    }
}

async fn realpath(c: &Conn, path: &str, host: &str) -> Result<String> {
    let n = c
        .raw
        .realpath(path.to_string())
        .await
        .map_err(|e| sftp_err("realpath", path, host, e))?;
    n.files
        .into_iter()
        .next()
        .map(|f| f.filename)
        .ok_or_else(|| Error::Ssh {
            host: host.to_string(),
            msg: format!("realpath {path}: empty answer"),
        })
}

/// The names in a remote directory (without `.` and `..`), sorted; `listed`
/// counts what the listing holds already, for the bound.
async fn read_dir(
    c: &Conn,
    dir: &str,
    host: &str,
    listed: usize,
) -> Result<Vec<(String, FileAttributes)>> {
    let h = c
        .raw
        .opendir(dir.to_string())
        .await
        .map_err(|e| sftp_err("opendir", dir, host, e))?
        .handle;
    let mut names = Vec::new();
    let r = loop {
        match c.raw.readdir(h.clone()).await {
            Ok(n) => names.extend(
                n.files
                    .into_iter()
                    .filter(|f| f.filename != "." && f.filename != "..")
                    .map(|f| (f.filename, f.attrs)),
            ),
            Err(SftpError::Status(s)) if s.status_code == StatusCode::Eof => break Ok(()),
            Err(e) => break Err(sftp_err("readdir", dir, host, e)),
        }
        if names.len() + listed > MAX_ENTRIES {
            break Err(Error::Usage(format!(
                "{dir}: too many entries (more than {MAX_ENTRIES})"
            )));
        }
    };
    let _ = c.raw.close(h).await;
    r?;
    names.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(names)
}
