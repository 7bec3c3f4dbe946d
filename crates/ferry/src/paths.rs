//! Turning a peer-supplied path into a place under the server's root, safely.
//!
//! Accepted: relative `/`-separated paths of normal components. Refused:
//! absolute paths, `..`, `.` used to climb, empty or NUL-bearing components,
//! Windows device names, and any existing component that is a symlink leaving
//! the root or is not a regular file or directory.

use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} is absolute; paths are relative to the server root")]
    Absolute(String),
    #[error("path {0:?} climbs out of the server root")]
    Escapes(String),
    #[error("path {0:?} has an invalid component")]
    Invalid(String),
    #[error("path {0:?} names a device or special file")]
    Device(String),
    #[error("path {0:?} goes through a symlink that leaves the server root")]
    SymlinkEscape(String),
}

const DEVICE_NAMES: &[&str] = &[
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// Checks the shape of a relative path and returns its normal components.
pub fn split_relative(p: &str) -> Result<Vec<String>, PathError> {
    if p.contains('\0') || p.contains('\\') {
        return Err(PathError::Invalid(p.into()));
    }
    if p.starts_with('/') {
        return Err(PathError::Absolute(p.into()));
    }
    let mut out = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::Normal(s) => {
                let s = s.to_str().ok_or_else(|| PathError::Invalid(p.into()))?;
                let stem = s.split('.').next().unwrap_or("").to_ascii_lowercase();
                if DEVICE_NAMES.contains(&stem.as_str()) {
                    return Err(PathError::Device(p.into()));
                }
                if crate::fsutil::is_part_name(s) {
                    return Err(PathError::Invalid(p.into()));
                }
                out.push(s.to_string());
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(PathError::Escapes(p.into())),
            Component::RootDir | Component::Prefix(_) => return Err(PathError::Absolute(p.into())),
        }
    }
    Ok(out)
}

/// Resolves `p` under `root` (which must be canonical). Existing components
/// are checked: a symlink must resolve inside the root, a special file is refused.
pub fn resolve(root: &Path, p: &str) -> Result<PathBuf, PathError> {
    let parts = split_relative(p)?;
    let mut cur = root.to_path_buf();
    for part in parts {
        step(root, &mut cur, &part, p)?;
    }
    Ok(cur)
}

/// [`resolve`] for many paths that share parents: each distinct parent is
/// resolved once (the cache), then only the last component is checked.
pub fn resolve_cached(
    root: &Path,
    p: &str,
    cache: &mut std::collections::HashMap<String, PathBuf>,
) -> Result<PathBuf, PathError> {
    resolve_cached_seen(root, p, cache).map(|(path, _)| path)
}

/// What resolving saw at the last component: the caller may skip its own
/// `stat` of the path (it can be stale by the time it is used).
#[derive(Debug)]
pub enum Seen {
    Missing,
    Found(std::fs::Metadata),
    /// A symlink (followed) or the root: not looked at as the final path.
    Unknown,
}

/// [`resolve_cached`], also saying what is at the resolved path.
pub fn resolve_cached_seen(
    root: &Path,
    p: &str,
    cache: &mut std::collections::HashMap<String, PathBuf>,
) -> Result<(PathBuf, Seen), PathError> {
    let parts = split_relative(p)?;
    let Some((last, parents)) = parts.split_last() else {
        return Ok((root.to_path_buf(), Seen::Unknown));
    };
    let key = parents.join("/");
    let mut cur = match cache.get(&key) {
        Some(c) => c.clone(),
        None => {
            let mut c = root.to_path_buf();
            for part in parents {
                step(root, &mut c, part, p)?;
            }
            cache.insert(key, c.clone());
            c
        }
    };
    let seen = step(root, &mut cur, last, p)?;
    Ok((cur, seen))
}

/// Appends one component, checking what is there: a symlink must resolve
/// inside the root, a special file is refused.
fn step(root: &Path, cur: &mut PathBuf, part: &str, p: &str) -> Result<Seen, PathError> {
    cur.push(part);
    match std::fs::symlink_metadata(&*cur) {
        Ok(md) => {
            let ft = md.file_type();
            if ft.is_symlink() {
                let real =
                    std::fs::canonicalize(&*cur).map_err(|_| PathError::SymlinkEscape(p.into()))?;
                if !real.starts_with(root) {
                    return Err(PathError::SymlinkEscape(p.into()));
                }
                // A link inside the root may still point at a device or a pipe.
                if let Ok(md) = std::fs::metadata(&real) {
                    let ft = md.file_type();
                    if ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket()
                    {
                        return Err(PathError::Device(p.into()));
                    }
                }
                *cur = real;
                Ok(Seen::Unknown)
            } else if ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket()
            {
                Err(PathError::Device(p.into()))
            } else {
                Ok(Seen::Found(md))
            }
        }
        // Does not exist (yet): the rest is created by us, under root.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Seen::Missing),
        Err(_) => Ok(Seen::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_hostile_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for bad in [
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/../b",
            "nul",
            "COM1.txt",
            "a\0b",
            "a\\..\\b",
            "x/.y.ferry.part",
        ] {
            assert!(resolve(&root, bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(resolve(&root, "a/b.txt").unwrap(), root.join("a/b.txt"));
        assert_eq!(resolve(&root, "./a").unwrap(), root.join("a"));
        assert_eq!(resolve(&root, "").unwrap(), root);
    }

    #[test]
    fn refuses_symlink_escape_but_allows_inside_links() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("in")).unwrap();
        assert_eq!(
            resolve(&root, "out/x"),
            Err(PathError::SymlinkEscape("out/x".into()))
        );
        assert_eq!(resolve(&root, "in/x").unwrap(), root.join("real/x"));
        // A link that stays inside the root but names a FIFO is refused too.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("real/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::os::unix::fs::symlink(root.join("real/fifo"), root.join("pipe")).unwrap();
        assert_eq!(
            resolve(&root, "pipe"),
            Err(PathError::Device("pipe".into()))
        );
        let mut cache = std::collections::HashMap::new();
        for _ in 0..2 {
            assert_eq!(
                resolve_cached(&root, "out/x", &mut cache),
                Err(PathError::SymlinkEscape("out/x".into()))
            );
            assert_eq!(
                resolve_cached(&root, "in/x", &mut cache).unwrap(),
                root.join("real/x")
            );
            assert_eq!(
                resolve_cached(&root, "in/y", &mut cache).unwrap(),
                root.join("real/y")
            );
            assert_eq!(
                resolve_cached(&root, "out", &mut cache),
                resolve(&root, "out")
            );
        }
        assert!(resolve(&root, "null").is_ok());
    }
}
