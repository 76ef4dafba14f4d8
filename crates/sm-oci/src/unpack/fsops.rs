//! File operations confined to a root directory.
//!
//! Every path is walked one component at a time from an fd on the root with
//! `openat(O_DIRECTORY | O_NOFOLLOW)`. A symlink met on the way is resolved by
//! hand *inside* the root: an absolute target restarts at the root (the guest's
//! `/`), and a `..` that would climb above the root is refused. The last
//! component is never followed: it is created with `O_EXCL | O_NOFOLLOW`,
//! `symlinkat`, `linkat` without `AT_SYMLINK_FOLLOW`, and so on. Nothing outside
//! the root can be written, whatever the layers contain or already created.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, IoContext, Result};

/// Symlinks followed while resolving one path, like the kernel's limit.
const MAX_SYMLINK_HOPS: u32 = 40;

/// An open root directory.
pub(crate) struct RootDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// A resolved location: an fd on the (real, in-root) parent directory, the
/// final name, and the resolved path relative to the root.
pub(crate) struct Loc {
    pub parent: OwnedFd,
    pub name: OsString,
    pub rel: PathBuf,
}

impl Loc {
    pub fn dir(&self) -> BorrowedFd<'_> {
        self.parent.as_fd()
    }
}

/// Split a layer path into clean components, the way containerd's unpacker
/// (`archive/tar.go`: `filepath.Clean`, then a join under the root) and Docker's
/// treat entry names: a leading `/` is dropped (names are relative to the
/// image's root, so umoci's `/` entry is the root itself), `.` and empty
/// components are dropped, `..` removes the component before it. Only a `..`
/// that would climb above the root is refused (containerd clamps it at the
/// root instead; we refuse, naming the entry, since no sane layer has one).
pub(crate) fn clean_components(raw: &[u8]) -> Result<Vec<OsString>> {
    let mut out: Vec<OsString> = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                if out.pop().is_none() {
                    return Err(Error::UnsafeEntry {
                        path: String::from_utf8_lossy(raw).into_owned(),
                        reason: "a '..' component climbs above the image root".into(),
                    });
                }
            }
            c => out.push(OsString::from_vec(c.to_vec())),
        }
    }
    Ok(out)
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// `lstat` of `name` in `dir`, `None` if absent.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(s) => Ok(Some(s)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(Error::io(format!("lstat {}", name.to_string_lossy()), e.into())),
    }
}

pub(crate) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Remove `name` in `dir`, recursively if it is a directory. Never follows symlinks.
pub(crate) fn remove_all_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    let Some(st) = lstat_at(dir, name)? else {
        return Ok(());
    };
    if file_type(&st) == FileType::Directory {
        let sub = rustix::fs::openat(dir, name, dir_flags(), Mode::empty())
            .ctx(|| format!("opening directory {} for removal", name.to_string_lossy()))?;
        clear_dir(sub.as_fd(), &|_| false)?;
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
            .ctx(|| format!("removing directory {}", name.to_string_lossy()))?;
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty()).ctx(|| format!("removing {}", name.to_string_lossy()))?;
    }
    Ok(())
}

/// Names in a directory (without `.` and `..`).
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    let d = rustix::fs::Dir::read_from(dir).ctx(|| "reading directory".into())?;
    for e in d {
        let e = e.ctx(|| "reading directory".into())?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(OsString::from_vec(n.to_vec()));
        }
    }
    Ok(out)
}

/// Remove every entry of `dir` for which `keep(name)` is false.
pub(crate) fn clear_dir(dir: BorrowedFd<'_>, keep: &dyn Fn(&OsStr) -> bool) -> Result<()> {
    for name in list_dir(dir)? {
        if !keep(&name) {
            remove_all_at(dir, &name)?;
        }
    }
    Ok(())
}

impl RootDir {
    /// Open (creating) the root directory.
    pub fn open(path: &Path) -> Result<RootDir> {
        std::fs::create_dir_all(path).at("creating", path)?;
        let fd = rustix::fs::openat(
            rustix::fs::CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .at("opening", path)?;
        Ok(RootDir { fd, path: path.to_path_buf() })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn reopen_root(&self) -> Result<OwnedFd> {
        rustix::fs::openat(self.fd.as_fd(), ".", dir_flags(), Mode::empty()).at("opening", &self.path)
    }

    /// Resolve `comps[..len-1]` as a directory inside the root (following in-root
    /// symlinks, creating missing directories when `create` is given, which is
    /// told each directory it creates) and return the location of the last
    /// component. `Ok(None)` when a parent is missing and `create` is `None`.
    /// `shown` names the entry in errors.
    pub fn locate(
        &self,
        comps: &[OsString],
        mut create: Option<&mut dyn FnMut(&Path)>,
        shown: &str,
    ) -> Result<Option<Loc>> {
        let (last, parents) = comps.split_last().ok_or_else(|| Error::UnsafeEntry {
            path: shown.to_string(),
            reason: "the root itself is not a valid target here".into(),
        })?;
        let unsafe_entry = |reason: String| Error::UnsafeEntry { path: shown.to_string(), reason };
        let mut stack: Vec<(OsString, OwnedFd)> = Vec::new();
        let mut queue: VecDeque<OsString> = parents.iter().cloned().collect();
        let mut hops = 0u32;
        while let Some(c) = queue.pop_front() {
            let cb = c.as_bytes();
            if cb.is_empty() || cb == b"." {
                continue;
            }
            if cb == b".." {
                if stack.pop().is_none() {
                    return Err(unsafe_entry("a symlink on its path points outside the root".into()));
                }
                continue;
            }
            let cur = match stack.last() {
                Some((_, fd)) => fd.as_fd(),
                None => self.fd.as_fd(),
            };
            match rustix::fs::openat(cur, c.as_os_str(), dir_flags(), Mode::empty()) {
                Ok(fd) => stack.push((c, fd)),
                Err(Errno::NOENT) => {
                    let Some(cb) = create.as_mut() else {
                        return Ok(None);
                    };
                    match rustix::fs::mkdirat(cur, c.as_os_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(Error::io(format!("creating directory for {shown}"), e.into())),
                    }
                    let rel: PathBuf = stack.iter().map(|(n, _)| n.as_os_str()).chain([c.as_os_str()]).collect();
                    cb(&rel);
                    queue.push_front(c);
                }
                Err(Errno::LOOP) | Err(Errno::NOTDIR) => {
                    let st = lstat_at(cur, &c)?.ok_or_else(|| unsafe_entry("path changed while unpacking".into()))?;
                    if file_type(&st) != FileType::Symlink {
                        return Err(unsafe_entry(format!("parent {:?} is not a directory", c.to_string_lossy())));
                    }
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return Err(unsafe_entry("too many levels of symbolic links".into()));
                    }
                    let target = rustix::fs::readlinkat(cur, c.as_os_str(), Vec::new())
                        .ctx(|| format!("reading symlink on the path of {shown}"))?;
                    let t = target.as_bytes();
                    if t.first() == Some(&b'/') {
                        stack.clear();
                    }
                    for part in t.split(|&b| b == b'/').rev() {
                        queue.push_front(OsString::from_vec(part.to_vec()));
                    }
                }
                Err(e) => return Err(Error::io(format!("opening a parent directory of {shown}"), e.into())),
            }
        }
        let rel: PathBuf = stack.iter().map(|(n, _)| n.as_os_str()).chain([last.as_os_str()]).collect();
        let parent = match stack.pop() {
            Some((_, fd)) => fd,
            None => self.reopen_root()?,
        };
        Ok(Some(Loc { parent, name: last.clone(), rel }))
    }

    /// Locate a path that was already resolved (no symlink may be followed on it).
    pub fn locate_resolved(&self, rel: &Path) -> Result<Option<Loc>> {
        let comps: Vec<OsString> = rel.iter().map(OsString::from).collect();
        let (last, parents) = match comps.split_last() {
            Some(x) => x,
            None => return Ok(None),
        };
        let mut cur = self.reopen_root()?;
        for c in parents {
            match rustix::fs::openat(cur.as_fd(), c.as_os_str(), dir_flags(), Mode::empty()) {
                Ok(fd) => cur = fd,
                Err(Errno::NOENT) | Err(Errno::LOOP) | Err(Errno::NOTDIR) => return Ok(None),
                Err(e) => return Err(Error::io(format!("opening {}", rel.display()), e.into())),
            }
        }
        Ok(Some(Loc { parent: cur, name: last.clone(), rel: rel.to_path_buf() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components() {
        let c = clean_components(b"./a//b/./c/").unwrap();
        assert_eq!(c, vec![OsString::from("a"), OsString::from("b"), OsString::from("c")]);
        assert!(clean_components(b"./").unwrap().is_empty());
        assert!(clean_components(b"/").unwrap().is_empty(), "umoci's root entry is the root");
        let c = |p: &[u8]| {
            clean_components(p).unwrap().iter().map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>().join("/")
        };
        assert_eq!(c(b"/etc/passwd"), "etc/passwd");
        assert_eq!(c(b"./usr//bin/./sh"), "usr/bin/sh");
        assert_eq!(c(b"a/b/../c"), "a/c");
        assert_eq!(c(b"/a/.."), "");
        assert!(clean_components(b"a/../../x").is_err());
        assert!(clean_components(b"..").is_err());
        assert!(clean_components(b"/../etc").is_err());
    }
}
