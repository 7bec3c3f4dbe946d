//! The one walker of local trees for uploads, native and SFTP alike: what
//! each source becomes on the other side.
//!
//! Symlinks follow rsync's rules. A symlink named as a source is followed,
//! as `cp` and `rsync` follow their arguments. One met inside a tree is
//! skipped with a warning unless links are followed (`-L`); then a link to a
//! directory on the current path (a loop) or to a directory already walked
//! is skipped with a warning, never entered, and a dangling link is skipped
//! with a warning.
//!
//! Names travel as UTF-8, so a name that is not UTF-8 cannot be carried: that
//! file (or directory) fails loudly, named with its bytes escaped, and the
//! rest of the copy goes on; so does one that a destination would refuse.
//! Two sources never land on one destination: the later one fails.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{error, warn};

use crate::error::{Error, Result};
use crate::fsutil;

/// How a source is walked.
#[derive(Debug, Clone, Copy, Default)]
pub struct WalkOptions {
    /// Walk directories (`-r`); without it a directory source is refused.
    pub recursive: bool,
    /// Follow symlinks met inside a tree (`-L`), with loop detection.
    pub follow_links: bool,
}

/// What one planned item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A directory to create, then stamp with its mode and mtime.
    Dir { mode: u32, mtime_ns: i64 },
    /// A regular file of this size.
    File { size: u64 },
}

/// One thing to create on the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub local: PathBuf,
    /// Where it goes: a `/`-separated path on the destination.
    pub dest: String,
    pub kind: Kind,
}

/// The items of an upload, directories before what they hold, plus what was
/// skipped (warnings) and what could not be copied (errors, one line each).
#[derive(Debug, Default)]
pub struct Plan {
    pub items: Vec<Planned>,
    /// One line per symlink or special file left out on purpose.
    pub skipped: Vec<String>,
    /// One line per file or directory that could not be copied.
    pub failed: Vec<String>,
    /// Which destinations are taken, and by what.
    claims: Claims,
    /// Checks a destination path before it is planned (`Err(why)`: refused).
    check: Option<DestCheck>,
}

/// Checks a destination path: `Err(why)` when the destination refuses it.
pub type DestCheck = fn(&str) -> std::result::Result<(), String>;

/// Destinations already taken: the guard that keeps two sources from landing
/// on one destination path.
#[derive(Debug, Default)]
pub struct Claims {
    taken: HashMap<String, (String, bool)>,
}

impl Claims {
    /// Takes `dest` for `source` (`is_dir`: a directory, which may be shared
    /// by several sources: their contents merge). `Ok(false)`: a directory
    /// taken already, nothing more to plan for it. `Err(line)`: another
    /// source has it.
    pub fn claim(
        &mut self,
        dest: &str,
        source: &str,
        is_dir: bool,
    ) -> std::result::Result<bool, String> {
        match self.taken.get(dest) {
            None => {
                self.taken
                    .insert(dest.to_string(), (source.to_string(), is_dir));
                Ok(true)
            }
            Some((_, true)) if is_dir => Ok(false),
            Some((other, _)) => Err(format!(
                "{source}: not copied: {other} is copied to the same destination {dest}"
            )),
        }
    }
}

/// A path for messages: valid UTF-8 as is, every other byte as `\xNN`, so
/// two names that differ only in invalid bytes never look alike.
pub fn escaped(p: &Path) -> String {
    escape_bytes(p.as_os_str().as_bytes())
}

/// [`escaped`] for raw bytes.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// `base/name`, or `name` when the base is empty (`/name` when it is `/`).
pub fn join(base: &str, name: &str) -> String {
    if base.starts_with('/') && base.trim_matches('/').is_empty() {
        return format!("/{name}");
    }
    let base = base.trim_end_matches('/');
    match (base.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (_, true) => base.to_string(),
        _ => format!("{base}/{name}"),
    }
}

/// Whether `rel` (a `/`-separated path a server listed) is safe to create
/// under a local directory: no empty, `.` or `..` component, no NUL, not
/// absolute. Any other byte, a backslash included, is a legal Unix name byte.
pub fn is_safe_relative(rel: &str) -> bool {
    !rel.is_empty()
        && !rel.starts_with('/')
        && !rel.contains('\0')
        && rel
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Identity of a directory: device and inode.
type DirId = (u64, u64);

fn dir_id(md: &std::fs::Metadata) -> DirId {
    (md.dev(), md.ino())
}

/// A directory waiting to be listed, with the directories on its path.
struct Frame {
    local: PathBuf,
    dest: String,
    md: std::fs::Metadata,
    ancestors: Vec<DirId>,
}

impl Plan {
    pub fn new() -> Plan {
        Plan::default()
    }

    /// A plan whose destination paths must also pass `check` (a native
    /// server refuses some names a local file system allows).
    pub fn with_check(check: DestCheck) -> Plan {
        Plan {
            check: Some(check),
            ..Plan::default()
        }
    }

    /// Plans `src`: into `dst` as `dst/NAME` when `into_dir`, else as `dst`
    /// itself. A missing source, a directory without `recursive`, or a source
    /// that is neither file nor directory is an error; trouble inside a tree
    /// is recorded in [`Plan::skipped`] and [`Plan::failed`].
    pub fn add_source(
        &mut self,
        src: &Path,
        dst: &str,
        into_dir: bool,
        opts: WalkOptions,
    ) -> Result<()> {
        // Named on the command line: followed, as cp and rsync do.
        let md = std::fs::metadata(src).map_err(|e| Error::local(src, e))?;
        if !md.is_file() && !md.is_dir() {
            return Err(Error::Usage(format!(
                "{} is not a regular file or directory",
                src.display()
            )));
        }
        if md.is_dir() && !opts.recursive {
            return Err(Error::Usage(format!(
                "{} is a directory (use -r)",
                src.display()
            )));
        }
        let target = if into_dir {
            let name = src.file_name().unwrap_or_default();
            match name.to_str() {
                Some(n) => join(dst, n),
                None => {
                    self.fail(not_utf8(src, md.is_dir()));
                    return Ok(());
                }
            }
        } else {
            dst.trim_end_matches('/').to_string()
        };
        if md.is_file() {
            self.push_file(src.to_path_buf(), target, md.len());
            return Ok(());
        }
        // The directories holding the source count as on its path: a link
        // back to one of them is a loop too.
        let holders = std::fs::canonicalize(src)
            .map(|c| {
                c.ancestors()
                    .skip(1)
                    .filter_map(|a| std::fs::metadata(a).ok())
                    .map(|m| dir_id(&m))
                    .collect()
            })
            .unwrap_or_default();
        self.walk(
            Frame {
                ancestors: holders,
                local: src.to_path_buf(),
                dest: target,
                md,
            },
            opts,
        )
    }

    fn fail(&mut self, line: String) {
        error!("{line}");
        self.failed.push(line);
    }

    fn skip(&mut self, line: String) {
        warn!("{line}");
        self.skipped.push(line);
    }

    fn checked(&mut self, local: &Path, dest: &str, is_dir: bool) -> bool {
        if let Some(check) = self.check {
            if let Err(why) = check(dest) {
                let what = if is_dir { " (and all it holds)" } else { "" };
                self.fail(format!("{}{what}: not copied: {why}", escaped(local)));
                return false;
            }
        }
        true
    }

    fn push_file(&mut self, local: PathBuf, dest: String, size: u64) {
        if !self.checked(&local, &dest, false) {
            return;
        }
        match self.claims.claim(&dest, &escaped(&local), false) {
            Ok(_) => self.items.push(Planned {
                local,
                dest,
                kind: Kind::File { size },
            }),
            Err(line) => self.fail(line),
        }
    }

    /// Walks a directory tree depth-first, each directory before its contents.
    fn walk(&mut self, top: Frame, opts: WalkOptions) -> Result<()> {
        let mut visited: HashSet<DirId> = HashSet::new();
        visited.insert(dir_id(&top.md));
        let mut stack = vec![top];
        let mut first = true;
        while let Some(f) = stack.pop() {
            if !self.checked(&f.local, &f.dest, true) {
                continue;
            }
            match self.claims.claim(&f.dest, &escaped(&f.local), true) {
                Ok(true) => self.items.push(Planned {
                    local: f.local.clone(),
                    dest: f.dest.clone(),
                    kind: Kind::Dir {
                        mode: f.md.mode() & 0o7777,
                        mtime_ns: fsutil::mtime_ns(&f.md),
                    },
                }),
                Ok(false) => {}
                Err(line) => {
                    self.fail(line);
                    continue;
                }
            }
            let read = match std::fs::read_dir(&f.local) {
                Ok(r) => r,
                // The source itself: the copy cannot go on without it.
                Err(e) if first => return Err(Error::local(&f.local, e)),
                Err(e) => {
                    self.fail(format!(
                        "{} (and all it holds): not copied: cannot read the directory: {e}",
                        escaped(&f.local)
                    ));
                    continue;
                }
            };
            first = false;
            let mut names: Vec<_> = read.flatten().map(|e| e.file_name()).collect();
            names.sort();
            let mut ancestors = f.ancestors.clone();
            ancestors.push(dir_id(&f.md));
            let mut subdirs = Vec::new();
            for name in names {
                if let Some(sub) = self.entry(&f, &name, &ancestors, &mut visited, opts) {
                    subdirs.push(sub);
                }
            }
            // Reversed, so the stack yields them in name order.
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }

    /// Looks at one name in a directory: plans a file, returns a directory
    /// to walk, or records why it is left out.
    fn entry(
        &mut self,
        parent: &Frame,
        name: &OsStr,
        ancestors: &[DirId],
        visited: &mut HashSet<DirId>,
        opts: WalkOptions,
    ) -> Option<Frame> {
        let local = parent.local.join(name);
        let lmd = match std::fs::symlink_metadata(&local) {
            Ok(m) => m,
            Err(e) => {
                // Gone since it was listed.
                self.skip(format!("skipping {}: {e}", escaped(&local)));
                return None;
            }
        };
        let is_link = lmd.file_type().is_symlink();
        let md = if is_link {
            if !opts.follow_links {
                self.skip(format!(
                    "skipping symlink {} (use -L to follow links)",
                    escaped(&local)
                ));
                return None;
            }
            match std::fs::metadata(&local) {
                Ok(m) => m,
                Err(e) => {
                    self.skip(format!(
                        "skipping symlink {}: it leads nowhere ({e})",
                        escaped(&local)
                    ));
                    return None;
                }
            }
        } else {
            lmd
        };
        if !md.is_dir() && !md.is_file() {
            self.skip(format!(
                "skipping {}: not a regular file or directory",
                escaped(&local)
            ));
            return None;
        }
        let Some(name) = name.to_str() else {
            self.fail(not_utf8(&local, md.is_dir()));
            return None;
        };
        let dest = join(&parent.dest, name);
        if md.is_file() {
            self.push_file(local, dest, md.len());
            return None;
        }
        let id = dir_id(&md);
        if ancestors.contains(&id) {
            self.skip(format!(
                "skipping symlink {}: it leads back to a directory that holds it (a loop)",
                escaped(&local)
            ));
            return None;
        }
        if !visited.insert(id) && is_link {
            self.skip(format!(
                "skipping symlink {}: it leads to a directory copied already",
                escaped(&local)
            ));
            return None;
        }
        Some(Frame {
            local,
            dest,
            md,
            ancestors: ancestors.to_vec(),
        })
    }
}

/// The error line for a name the wire cannot carry.
fn not_utf8(p: &Path, is_dir: bool) -> String {
    let what = if is_dir { " (and all it holds)" } else { "" };
    format!(
        "{}{what}: not copied: the name is not valid UTF-8, which ferry cannot carry (rename it)",
        escaped(p)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_invalid_bytes_only() {
        let p = Path::new(OsStr::from_bytes(b"d/\xc3\xa9a\xff\xfe\n"));
        assert_eq!(escaped(p), "d/éa\\xff\\xfe\\n");
        assert_ne!(
            escaped(Path::new(OsStr::from_bytes(b"a\xff"))),
            escaped(Path::new(OsStr::from_bytes(b"a\xfe")))
        );
    }

    #[test]
    fn safe_relative_allows_backslash_only() {
        assert!(is_safe_relative("a\\b"));
        assert!(is_safe_relative("d/con.txt"));
        for bad in ["", "/a", "a//b", "a/./b", "../a", "a/..", "a\0b", "."] {
            assert!(!is_safe_relative(bad), "{bad:?}");
        }
    }

    #[test]
    fn joins_under_the_root_too() {
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("d/", "a"), "d/a");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/t", "a"), "/t/a");
        assert_eq!(join("d", ""), "d");
    }

    #[test]
    fn claims_refuse_a_second_file_and_merge_directories() {
        let mut c = Claims::default();
        assert_eq!(c.claim("d", "a/d", true), Ok(true));
        assert_eq!(c.claim("d", "b/d", true), Ok(false));
        assert_eq!(c.claim("d/f", "a/d/f", false), Ok(true));
        assert!(c.claim("d/f", "b/d/f", false).is_err());
        assert!(c.claim("d", "c/d", false).is_err());
    }
}
