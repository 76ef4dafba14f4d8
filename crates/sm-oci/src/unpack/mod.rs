//! Apply image layers, in order, into a directory.
//!
//! Layers may be gzip, zstd or uncompressed tar (detected from the stream's
//! magic bytes). Whiteouts are honoured (`.wh.NAME` removes NAME from lower
//! layers; `.wh..wh..opq` empties a directory of lower-layer content, keeping
//! what the same layer adds), as are hard links, symlinks, permissions
//! (including setuid/setgid/sticky), mtimes and ownership.
//!
//! Entry names are taken as containerd and Docker take them: relative to the
//! image root whether or not they start with `/` (umoci writes the root as a
//! `/` entry), `.` and empty components dropped, `..` applied lexically.
//! `crates/sm-oci/LAYERS.md` compares every point with containerd's unpacker.
//!
//! Entry kinds: regular files (GNU sparse ones expanded), directories, symlinks
//! (absolute, relative, dangling: stored as written), hard links (to entries of
//! this or a lower layer), fifos, and character/block devices — created when
//! running as root, as containerd does; without root they cannot be made and
//! are skipped with a warning in [`UnpackReport::warnings`], like rootless
//! containerd. PAX and GNU long names and links are read by the `tar` crate.
//! Extended attributes from PAX `SCHILY.xattr.*` records (`security.capability`
//! included) are applied after owner and mode, since a chown clears file
//! capabilities; those the host filesystem or our privileges refuse are listed
//! in the warnings. Other tar kinds (none that containerd creates) are skipped
//! with a warning.
//!
//! Safety: a `..` that climbs above the root and symlinks that would carry a
//! write out of the root are refused with [`Error::UnsafeEntry`]; every file
//! operation is confined to the target directory (see `fsops`). Device nodes
//! and setuid files are created below the store's `tmp/` (mode 0700). A
//! stream that is not valid (truncated, corrupted, or not hashing to its
//! digest / diff_id) gives [`Error::CorruptLayer`] or [`Error::DigestMismatch`];
//! the target is then partially written and must be discarded by the caller
//! (the rootfs builder unpacks into a temp dir).
//!
//! Ownership: as root, uid/gid from the layer are applied. Otherwise `chown`
//! fails for foreign ids; those entries are listed in [`UnpackReport::unowned`]
//! and the rootfs builder maps everything to root (see `rootfs`).
//! Directory modes and mtimes are applied after the last layer so the tree is
//! identical whatever the order of writes; directories created implicitly get
//! mode 0755 and mtime 0.

mod fsops;

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;
use tar::EntryType;

use crate::digest::{Digest, HashingReader};
use crate::error::{Error, IoContext, Result};
use crate::store::{ImageInfo, Store};
use fsops::{clean_components, file_type, list_dir, lstat_at, remove_all_at, Loc, RootDir};

const OPAQUE: &[u8] = b".wh..wh..opq";
const WHITEOUT_PREFIX: &[u8] = b".wh.";

/// What an unpack did.
#[derive(Clone, Debug, Default)]
pub struct UnpackReport {
    /// Layers applied.
    pub layers: usize,
    /// Tar entries processed (including whiteouts).
    pub entries: u64,
    /// File content bytes written.
    pub bytes: u64,
    /// Entries whose owner could not be set (not running as root): path
    /// relative to the root -> (uid, gid) from the layer.
    pub unowned: BTreeMap<PathBuf, (u32, u32)>,
    /// Entries skipped, with why.
    pub warnings: Vec<String>,
}

#[derive(Clone, Copy)]
struct DirMeta {
    mode: u32,
    mtime: i64,
}

/// Applies layers one after another into a target directory.
pub struct Unpacker {
    root: RootDir,
    dirs: BTreeMap<PathBuf, DirMeta>,
    root_meta: DirMeta,
    report: UnpackReport,
    is_root: bool,
}

/// Unpack every layer of `image` from `store` into `target` (created if needed;
/// normally empty). Each layer is checked against its digest and the config's
/// diff_id.
pub fn unpack_image(store: &Store, image: &ImageInfo, target: &Path) -> Result<UnpackReport> {
    let mut u = Unpacker::new(target)?;
    for (i, l) in image.layers.iter().enumerate() {
        let f = store.open_blob(&l.digest)?;
        u.apply_layer(f, &l.digest.to_string(), Some(&l.digest), image.config.diff_ids.get(i))?;
    }
    u.finish()
}

impl Unpacker {
    /// Start unpacking into `target` (created if missing).
    pub fn new(target: &Path) -> Result<Unpacker> {
        Ok(Unpacker {
            root: RootDir::open(target)?,
            dirs: BTreeMap::new(),
            root_meta: DirMeta { mode: 0o755, mtime: 0 },
            report: UnpackReport::default(),
            is_root: rustix::process::geteuid().is_root(),
        })
    }

    /// Apply one layer blob. `what` names it in errors. With `digest`, the raw
    /// blob must hash to it; with `diff_id`, the uncompressed tar must.
    pub fn apply_layer<R: Read>(
        &mut self,
        blob: R,
        what: &str,
        digest: Option<&Digest>,
        diff_id: Option<&Digest>,
    ) -> Result<()> {
        let corrupt = |e: io::Error| Error::CorruptLayer { layer: what.to_string(), detail: e.to_string() };
        let mut raw = HashingReader::new(blob);
        let mut buffered = BufReader::with_capacity(256 << 10, &mut raw);
        let head = buffered.fill_buf().map_err(corrupt)?;
        let decoder: Box<dyn Read + '_> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(corrupt)?)
        } else {
            Box::new(buffered)
        };
        let mut diff = HashingReader::new(decoder);
        let mut layer_paths = HashSet::new();
        {
            let mut archive = tar::Archive::new(&mut diff);
            for entry in archive.entries().map_err(corrupt)? {
                let mut entry = entry.map_err(corrupt)?;
                self.report.entries += 1;
                self.apply_entry(&mut entry, &mut layer_paths, what)?;
            }
        }
        let (got_diff, _) = diff.drain_and_finish().map_err(corrupt)?;
        let (got, _) = raw.drain_and_finish().map_err(corrupt)?;
        if let Some(d) = digest {
            d.verify(&got, format_args!("layer {what}"))?;
        }
        if let Some(d) = diff_id {
            d.verify(&got_diff, format_args!("uncompressed layer {what} (diff_id)"))?;
        }
        self.report.layers += 1;
        Ok(())
    }

    /// Apply directory modes and mtimes, and return the report.
    pub fn finish(mut self) -> Result<UnpackReport> {
        let mut dirs: Vec<(PathBuf, DirMeta)> = std::mem::take(&mut self.dirs).into_iter().collect();
        // Deepest first, so setting a child's mtime does not disturb its parent's.
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, meta) in dirs {
            let Some(loc) = self.root.locate_resolved(&rel)? else {
                continue;
            };
            let fd = match rustix::fs::openat(
                loc.dir(),
                &loc.name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::LOOP) | Err(Errno::NOTDIR) => continue,
                Err(e) => return Err(Error::io(format!("opening {}", rel.display()), e.into())),
            };
            set_mode_times(fd.as_fd(), meta.mode, meta.mtime, &rel)?;
        }
        set_mode_times(self.root.fd(), self.root_meta.mode, self.root_meta.mtime, Path::new("/"))?;
        Ok(self.report)
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        layer_paths: &mut HashSet<PathBuf>,
        what: &str,
    ) -> Result<()> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let et = entry.header().entry_type();
        if matches!(et, EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink)
        {
            return Ok(());
        }
        let comps = clean_components(&raw_path)?;
        // Blank numeric fields read as 0, like Go's archive/tar.
        let h = entry.header();
        let mode = h.mode().unwrap_or(0) & 0o7777;
        let uid = h.uid().ok().and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        let gid = h.gid().ok().and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        let mtime = h.mtime().ok().and_then(|v| i64::try_from(v).ok()).unwrap_or(0);
        let device = rustix::fs::makedev(
            h.device_major().ok().flatten().unwrap_or(0),
            h.device_minor().ok().flatten().unwrap_or(0),
        );

        if let Some(last) = comps.last() {
            let lb = last.as_bytes();
            if lb == OPAQUE {
                return self.opaque(&comps[..comps.len() - 1], layer_paths, &shown);
            }
            if let Some(victim) = lb.strip_prefix(WHITEOUT_PREFIX) {
                let mut target = comps[..comps.len() - 1].to_vec();
                target.push(OsStr::from_bytes(victim).to_os_string());
                let target = clean_components(&join(&target))?;
                if target.len() != comps.len() {
                    return Err(Error::UnsafeEntry { path: shown, reason: "invalid whiteout name".into() });
                }
                if let Some(loc) = self.root.locate(&target, None, &shown)? {
                    remove_all_at(loc.dir(), &loc.name)?;
                }
                return Ok(());
            }
        } else {
            if et != EntryType::Directory {
                return Err(Error::UnsafeEntry { path: shown, reason: "a non-directory entry for the root".into() });
            }
            self.root_meta = DirMeta { mode, mtime };
            if !try_chown(self.root.fd(), OsStr::new(""), uid, gid, Path::new("/"))? {
                self.report.unowned.insert(PathBuf::from("/"), (uid, gid));
            }
            return Ok(());
        }

        match et {
            EntryType::Char | EntryType::Block if !self.is_root => {
                self.report
                    .warnings
                    .push(format!("{what}: skipped device node {shown:?}: creating device nodes needs root"));
                return Ok(());
            }
            EntryType::Char
            | EntryType::Block
            | EntryType::Regular
            | EntryType::Continuous
            | EntryType::GNUSparse
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link
            | EntryType::Fifo => {}
            other => {
                self.report.warnings.push(format!("{what}: skipped {shown:?} of unsupported tar type {other:?}"));
                return Ok(());
            }
        }

        let dirs = &mut self.dirs;
        let mut on_create = |p: &Path| {
            dirs.insert(p.to_path_buf(), DirMeta { mode: 0o755, mtime: 0 });
        };
        let loc = self
            .root
            .locate(&comps, Some(&mut on_create), &shown)?
            .ok_or_else(|| Error::io(format!("resolving {shown}"), io::ErrorKind::NotFound.into()))?;
        let ts = |t: i64| Timestamps {
            last_access: Timespec { tv_sec: t, tv_nsec: 0 },
            last_modification: Timespec { tv_sec: t, tv_nsec: 0 },
        };
        let existing = lstat_at(loc.dir(), &loc.name)?;
        let xattrs = pax_xattrs(entry, what, &shown)?;
        match et {
            EntryType::Directory => {
                if existing.is_some_and(|s| file_type(&s) != FileType::Directory) {
                    remove_all_at(loc.dir(), &loc.name)?;
                }
                if !existing.is_some_and(|s| file_type(&s) == FileType::Directory) {
                    rustix::fs::mkdirat(loc.dir(), &loc.name, Mode::from_raw_mode(0o700))
                        .at("creating directory", &loc.rel)?;
                }
                let fd = rustix::fs::openat(
                    loc.dir(),
                    &loc.name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .at("opening directory", &loc.rel)?;
                self.chown(fd.as_fd(), OsStr::new(""), uid, gid, &loc.rel)?;
                // Keep the directory writable for us until `finish` applies its mode.
                let now_mode = if self.is_root { mode } else { mode | 0o700 };
                rustix::fs::fchmod(&fd, Mode::from_raw_mode(now_mode)).at("chmod", &loc.rel)?;
                self.set_xattrs(fd.as_fd(), OsStr::new(""), &xattrs, &loc.rel)?;
                self.dirs.insert(loc.rel.clone(), DirMeta { mode, mtime });
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                if existing.is_some() {
                    remove_all_at(loc.dir(), &loc.name)?;
                }
                let fd = rustix::fs::openat(
                    loc.dir(),
                    &loc.name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .at("creating file", &loc.rel)?;
                let mut file = File::from(fd);
                self.report.bytes += copy_entry(entry, &mut file, what, &shown, &loc.rel)?;
                self.chown(file.as_fd(), OsStr::new(""), uid, gid, &loc.rel)?;
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).at("chmod", &loc.rel)?;
                self.set_xattrs(file.as_fd(), OsStr::new(""), &xattrs, &loc.rel)?;
                rustix::fs::futimens(&file, &ts(mtime)).at("setting mtime of", &loc.rel)?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| Error::UnsafeEntry {
                        path: shown.clone(),
                        reason: "symlink without a target".into(),
                    })?
                    .into_owned();
                if existing.is_some() {
                    remove_all_at(loc.dir(), &loc.name)?;
                }
                rustix::fs::symlinkat(OsStr::from_bytes(&target), loc.dir(), &loc.name)
                    .at("creating symlink", &loc.rel)?;
                self.chown(loc.dir(), &loc.name, uid, gid, &loc.rel)?;
                self.set_xattrs(loc.dir(), &loc.name, &xattrs, &loc.rel)?;
                rustix::fs::utimensat(loc.dir(), &loc.name, &ts(mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .at("setting mtime of", &loc.rel)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| Error::UnsafeEntry {
                        path: shown.clone(),
                        reason: "hard link without a target".into(),
                    })?
                    .into_owned();
                let tcomps = clean_components(&target).map_err(|e| match e {
                    Error::UnsafeEntry { reason, .. } => {
                        Error::UnsafeEntry { path: shown.clone(), reason: format!("hard link target: {reason}") }
                    }
                    e => e,
                })?;
                let tloc = self.root.locate(&tcomps, None, &shown)?;
                let tloc = tloc.ok_or_else(|| {
                    Error::invalid(
                        what,
                        format!("hard link {shown:?} to missing {:?}", String::from_utf8_lossy(&target)),
                    )
                })?;
                if tloc.rel == loc.rel {
                    return Ok(());
                }
                match lstat_at(tloc.dir(), &tloc.name)? {
                    None => {
                        return Err(Error::invalid(
                            what,
                            format!("hard link {shown:?} to missing {:?}", String::from_utf8_lossy(&target)),
                        ))
                    }
                    Some(s) if file_type(&s) == FileType::Directory => {
                        return Err(Error::UnsafeEntry { path: shown, reason: "hard link to a directory".into() })
                    }
                    Some(_) => {}
                }
                if existing.is_some() {
                    remove_all_at(loc.dir(), &loc.name)?;
                }
                rustix::fs::linkat(tloc.dir(), &tloc.name, loc.dir(), &loc.name, AtFlags::empty())
                    .at("creating hard link", &loc.rel)?;
            }
            EntryType::Fifo | EntryType::Char | EntryType::Block => {
                if existing.is_some() {
                    remove_all_at(loc.dir(), &loc.name)?;
                }
                let (kind, dev) = match et {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    EntryType::Char => (FileType::CharacterDevice, device),
                    _ => (FileType::BlockDevice, device),
                };
                // Mode 0 until owner and mode are set: nobody opens it in between.
                match rustix::fs::mknodat(loc.dir(), &loc.name, kind, Mode::empty(), dev) {
                    Ok(()) => {}
                    // Root without CAP_MKNOD (a user namespace): as without root.
                    Err(Errno::PERM) if kind != FileType::Fifo => {
                        self.report
                            .warnings
                            .push(format!("{what}: skipped device node {shown:?}: mknod not permitted"));
                        return Ok(());
                    }
                    Err(e) => return Err(Error::io(format!("creating node {}", loc.rel.display()), e.into())),
                }
                self.chown(loc.dir(), &loc.name, uid, gid, &loc.rel)?;
                rustix::fs::chmodat(loc.dir(), &loc.name, Mode::from_raw_mode(mode), AtFlags::empty())
                    .at("chmod", &loc.rel)?;
                self.set_xattrs(loc.dir(), &loc.name, &xattrs, &loc.rel)?;
                rustix::fs::utimensat(loc.dir(), &loc.name, &ts(mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .at("setting mtime of", &loc.rel)?;
            }
            _ => unreachable!("filtered above"),
        }
        layer_paths.insert(loc.rel);
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: remove lower-layer content of `dir`.
    fn opaque(&mut self, dir: &[OsString], layer_paths: &HashSet<PathBuf>, shown: &str) -> Result<()> {
        let (fd, rel) = if dir.is_empty() {
            (
                rustix::fs::openat(
                    self.root.fd(),
                    ".",
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .at("opening", self.root.path())?,
                PathBuf::new(),
            )
        } else {
            let dirs = &mut self.dirs;
            let mut on_create = |p: &Path| {
                dirs.insert(p.to_path_buf(), DirMeta { mode: 0o755, mtime: 0 });
            };
            let loc: Loc = self
                .root
                .locate(dir, Some(&mut on_create), shown)?
                .ok_or_else(|| Error::io(format!("resolving {shown}"), io::ErrorKind::NotFound.into()))?;
            match lstat_at(loc.dir(), &loc.name)? {
                Some(s) if file_type(&s) == FileType::Directory => {}
                Some(_) => {
                    return Err(Error::UnsafeEntry {
                        path: shown.to_string(),
                        reason: "opaque marker inside a non-directory".into(),
                    })
                }
                None => {
                    rustix::fs::mkdirat(loc.dir(), &loc.name, Mode::from_raw_mode(0o755))
                        .at("creating directory", &loc.rel)?;
                    self.dirs.insert(loc.rel.clone(), DirMeta { mode: 0o755, mtime: 0 });
                }
            }
            let fd = rustix::fs::openat(
                loc.dir(),
                &loc.name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .at("opening directory", &loc.rel)?;
            (fd, loc.rel)
        };
        clear_opaque(fd.as_fd(), &rel, layer_paths)
    }

    /// Applies an entry's extended attributes to `name` in `dir` (`name` empty:
    /// `dir` itself), never following a symlink. Those refused for want of
    /// privilege or support become warnings.
    fn set_xattrs(&mut self, dir: BorrowedFd<'_>, name: &OsStr, xattrs: &[Xattr], rel: &Path) -> Result<()> {
        for x in xattrs {
            let r = if name.is_empty() {
                rustix::fs::fsetxattr(dir, x.name.as_str(), &x.value, rustix::fs::XattrFlags::empty())
            } else {
                // The in-root parent through its fd; the last component is not followed.
                let path = Path::new("/proc/self/fd").join(rustix::fd::AsRawFd::as_raw_fd(&dir).to_string()).join(name);
                rustix::fs::lsetxattr(&path, x.name.as_str(), &x.value, rustix::fs::XattrFlags::empty())
            };
            match r {
                Ok(()) => {}
                Err(e @ (Errno::PERM | Errno::ACCESS | Errno::NOTSUP)) => self.report.warnings.push(format!(
                    "extended attribute {} of {} not applied: {e}",
                    x.name,
                    rel.display()
                )),
                Err(e) => return Err(Error::io(format!("setting {} on {}", x.name, rel.display()), e.into())),
            }
        }
        Ok(())
    }

    fn chown(&mut self, dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32, rel: &Path) -> Result<()> {
        if !try_chown(dir, name, uid, gid, rel)? {
            self.report.unowned.insert(rel.to_path_buf(), (uid, gid));
        }
        Ok(())
    }
}

/// One extended attribute of an entry.
struct Xattr {
    name: String,
    value: Vec<u8>,
}

/// Longest extended attribute value Linux stores (`XATTR_SIZE_MAX`).
const XATTR_SIZE_MAX: usize = 64 << 10;

/// The `SCHILY.xattr.NAME=VALUE` records of an entry's PAX header (the form
/// Docker, containerd, umoci and GNU tar write), in order.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, what: &str, shown: &str) -> Result<Vec<Xattr>> {
    let corrupt = |detail: String| Error::CorruptLayer { layer: what.to_string(), detail };
    let Some(exts) = entry.pax_extensions().map_err(|e| corrupt(format!("PAX header: {e}")))? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for ext in exts {
        let ext = ext.map_err(|e| corrupt(format!("PAX header: {e}")))?;
        let Ok(key) = ext.key() else { continue };
        if key.starts_with("GNU.sparse.") {
            // The tar crate expands only old-GNU sparse entries; these would be
            // written with their sparse map as content.
            return Err(Error::invalid(
                what,
                format!(
                    "{shown:?} is a PAX-format sparse file (GNU tar --sparse --format=pax), which is not supported"
                ),
            ));
        }
        let Some(name) = key.strip_prefix("SCHILY.xattr.") else { continue };
        if name.is_empty() || ext.value_bytes().len() > XATTR_SIZE_MAX {
            return Err(corrupt(format!("PAX header: extended attribute {name:?} is empty or too large")));
        }
        out.push(Xattr { name: name.to_string(), value: ext.value_bytes().to_vec() });
    }
    Ok(out)
}

/// chown without following symlinks (`name` empty: `dir` itself). `Ok(false)`
/// when not permitted (not root).
fn try_chown(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32, rel: &Path) -> Result<bool> {
    let flags = if name.is_empty() { AtFlags::EMPTY_PATH } else { AtFlags::SYMLINK_NOFOLLOW };
    match rustix::fs::chownat(dir, name, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), flags) {
        Ok(()) => Ok(true),
        Err(Errno::PERM) | Err(Errno::INVAL) => Ok(false),
        Err(e) => Err(Error::io(format!("chown {}", rel.display()), e.into())),
    }
}

/// Remove what lower layers left in an opaque directory: keep entries this layer
/// wrote, and recurse into directories it (re)declared.
fn clear_opaque(dir: BorrowedFd<'_>, rel: &Path, layer_paths: &HashSet<PathBuf>) -> Result<()> {
    for name in list_dir(dir)? {
        let child = rel.join(&name);
        if !layer_paths.contains(&child) {
            remove_all_at(dir, &name)?;
            continue;
        }
        if lstat_at(dir, &name)?.is_some_and(|s| file_type(&s) == FileType::Directory) {
            let sub = rustix::fs::openat(
                dir,
                &name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .at("opening directory", &child)?;
            clear_opaque(sub.as_fd(), &child, layer_paths)?;
        }
    }
    Ok(())
}

fn set_mode_times(fd: BorrowedFd<'_>, mode: u32, mtime: i64, rel: &Path) -> Result<()> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode)).at("chmod", rel)?;
    let t = Timespec { tv_sec: mtime, tv_nsec: 0 };
    rustix::fs::futimens(fd, &Timestamps { last_access: t, last_modification: t }).at("setting mtime of", rel)?;
    Ok(())
}

fn join(comps: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in comps.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(c.as_bytes());
    }
    out
}

/// Copy entry content; read errors mean a corrupt layer, write errors are I/O.
fn copy_entry(src: &mut impl Read, dst: &mut File, what: &str, shown: &str, rel: &Path) -> Result<u64> {
    let mut buf = vec![0u8; 128 << 10];
    let mut total = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Error::CorruptLayer { layer: what.to_string(), detail: format!("reading {shown:?}: {e}") })
            }
        };
        dst.write_all(&buf[..n]).at("writing", rel)?;
        total += n as u64;
    }
    Ok(total)
}
