//! The FUSE server: one request in, at most one reply out, for a host
//! directory passed through (see [`crate::sys`] for how it stays inside).
//! This file holds the set-up, the dispatch and the name-space operations;
//! `io.rs` the open files and directories.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use fuse_abi::linux::{self as abi, fuse_opcode as op};
use zerocopy::IntoBytes;

use crate::dax::{DaxWindow, DAX_PAGE_SHIFT};
use crate::request::{self, Args, Request};
use crate::sys::{self, Errno, SysResult};
use crate::tables::{HandleTable, Inode, InodeTable};

/// Largest READ/WRITE payload (what INIT announces as `max_write`).
pub const MAX_IO: usize = 1 << 20;
/// Largest request the device accepts: a WRITE of [`MAX_IO`] plus headers.
pub const MAX_REQUEST: usize = MAX_IO + 4096;
/// How long the guest may cache entries and attributes (seconds): the host
/// may change the directory under it, so not long.
const CACHE_SECS: u64 = 1;

/// What to share and how.
#[derive(Debug, Clone)]
pub struct ShareConfig {
    /// The host directory.
    pub root: PathBuf,
    /// Refuse every change (EROFS).
    pub read_only: bool,
    /// Inodes the guest may hold looked up at once (ENFILE beyond).
    pub max_inodes: usize,
    /// Files the guest may hold open at once (EMFILE beyond).
    pub max_handles: usize,
    /// Bytes of DAX window (a multiple of 2 MiB; 0: no DAX, file data goes
    /// through the queue).
    pub dax_window: u64,
}

impl ShareConfig {
    /// `root` read-write, 65536 inodes, 4096 open files.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ShareConfig { root: root.into(), read_only: false, max_inodes: 65536, max_handles: 4096, dax_window: 0 }
    }
}

/// Why a share could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// The directory cannot be opened.
    #[error("cannot share {}: {source}", path.display())]
    Open {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The DAX window cannot be reserved.
    #[error("cannot reserve a DAX window of {len} bytes: {source}")]
    Dax {
        /// Its size.
        len: u64,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A FUSE server for one shared directory.
pub struct FuseServer {
    pub(crate) inodes: Mutex<InodeTable>,
    pub(crate) handles: Mutex<HandleTable>,
    pub(crate) read_only: bool,
    /// The DAX window, when the share has one.
    pub(crate) dax: Option<Mutex<DaxWindow>>,
    initialized: AtomicBool,
    root: PathBuf,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The reply of a handler: a payload, an error, or nothing (FORGET).
pub(crate) enum Outcome {
    Reply(Vec<u8>),
    Error(Errno),
    NoReply,
}

impl From<SysResult<Vec<u8>>> for Outcome {
    fn from(r: SysResult<Vec<u8>>) -> Self {
        match r {
            Ok(v) => Outcome::Reply(v),
            Err(e) => Outcome::Error(e),
        }
    }
}

impl FuseServer {
    /// Opens the share.
    pub fn new(config: &ShareConfig) -> Result<FuseServer, ShareError> {
        let err = |source| ShareError::Open { path: config.root.clone(), source };
        let root = sys::open_root(&config.root).map_err(err)?;
        let st = sys::stat(root.as_fd()).map_err(|e| err(std::io::Error::from_raw_os_error(e.0)))?;
        let dax = match config.dax_window {
            0 => None,
            len => Some(Mutex::new(DaxWindow::new(len).map_err(|source| ShareError::Dax { len, source })?)),
        };
        Ok(FuseServer {
            dax,
            inodes: Mutex::new(InodeTable::new(root, (st.st_dev, st.st_ino), config.max_inodes)),
            handles: Mutex::new(HandleTable::new(config.max_handles)),
            read_only: config.read_only,
            initialized: AtomicBool::new(false),
            root: config.root.clone(),
        })
    }

    /// The shared directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the guest has started a session (FUSE_INIT) that is not over.
    pub fn is_initialized(&self) -> bool {
        self.initialized.load(Ordering::Acquire)
    }

    pub(crate) fn set_initialized(&self, on: bool) {
        self.initialized.store(on, Ordering::Release);
    }

    /// Inodes and open files held now (for tests and stats).
    pub fn held(&self) -> (usize, usize) {
        (lock(&self.inodes).len(), lock(&self.handles).len())
    }

    /// Answers one request; `None` when FUSE wants no reply (FORGET,
    /// INTERRUPT) or the bytes are not even a header.
    pub fn handle(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let (req, consistent) = Request::parse(bytes)?;
        let unique = req.header.unique;
        let outcome = if !consistent { Outcome::Error(Errno(libc::EINVAL)) } else { self.dispatch(&req) };
        match outcome {
            Outcome::Reply(payload) => Some(request::reply(unique, &payload)),
            Outcome::Error(e) => Some(request::error(unique, e)),
            Outcome::NoReply => None,
        }
    }

    fn dispatch(&self, req: &Request<'_>) -> Outcome {
        let h = &req.header;
        let mut args = Args(req.body);
        let opcode = h.opcode;
        if opcode == op::FUSE_INIT as u32 {
            return self.init(&mut args).into();
        }
        if !self.initialized.load(Ordering::Acquire) {
            return Outcome::Error(Errno(libc::EIO));
        }
        let node = h.nodeid;
        let result = match opcode {
            x if x == op::FUSE_FORGET as u32 => {
                if let Ok(f) = args.take::<abi::fuse_forget_in>() {
                    lock(&self.inodes).forget(node, f.nlookup);
                }
                return Outcome::NoReply;
            }
            x if x == op::FUSE_BATCH_FORGET as u32 => {
                self.batch_forget(&mut args);
                return Outcome::NoReply;
            }
            x if x == op::FUSE_INTERRUPT as u32 => return Outcome::NoReply,
            x if x == op::FUSE_DESTROY as u32 => {
                self.clear_dax();
                lock(&self.handles).clear();
                lock(&self.inodes).clear();
                self.initialized.store(false, Ordering::Release);
                Ok(Vec::new())
            }
            x if x == op::FUSE_LOOKUP as u32 => args.name().and_then(|n| self.lookup(node, n)),
            x if x == op::FUSE_GETATTR as u32 => self.getattr(node),
            x if x == op::FUSE_SETATTR as u32 => self.setattr(node, &mut args),
            x if x == op::FUSE_READLINK as u32 => self.readlink(node),
            x if x == op::FUSE_SYMLINK as u32 => self.symlink(node, &mut args),
            x if x == op::FUSE_MKNOD as u32 => self.mknod(node, &mut args),
            x if x == op::FUSE_MKDIR as u32 => self.mkdir(node, &mut args),
            x if x == op::FUSE_UNLINK as u32 => self.unlink(node, &mut args, false),
            x if x == op::FUSE_RMDIR as u32 => self.unlink(node, &mut args, true),
            x if x == op::FUSE_RENAME as u32 => self.rename(node, &mut args, false),
            x if x == op::FUSE_RENAME2 as u32 => self.rename(node, &mut args, true),
            x if x == op::FUSE_LINK as u32 => self.link(node, &mut args),
            x if x == op::FUSE_STATFS as u32 => self.statfs(),
            x if x == op::FUSE_ACCESS as u32 => self.access(node, &mut args),
            x if x == op::FUSE_OPEN as u32 => self.open(node, &mut args),
            x if x == op::FUSE_CREATE as u32 => self.create(node, &mut args),
            x if x == op::FUSE_READ as u32 => self.read(&mut args),
            x if x == op::FUSE_WRITE as u32 => self.write(&mut args),
            x if x == op::FUSE_FLUSH as u32 => self.flush(&mut args),
            x if x == op::FUSE_RELEASE as u32 || x == op::FUSE_RELEASEDIR as u32 => self.release(&mut args),
            x if x == op::FUSE_FSYNC as u32 || x == op::FUSE_FSYNCDIR as u32 => self.fsync(&mut args),
            x if x == op::FUSE_OPENDIR as u32 => self.opendir(node),
            x if x == op::FUSE_READDIR as u32 => self.readdir(&mut args),
            x if x == op::FUSE_FALLOCATE as u32 => self.fallocate(&mut args),
            x if x == op::FUSE_SETUPMAPPING as u32 => self.setup_mapping(node, &mut args),
            x if x == op::FUSE_REMOVEMAPPING as u32 => self.remove_mapping(&mut args),
            // Extended attributes, locks, ioctl, ...: not
            // offered; ENOSYS makes the kernel stop asking.
            _ => Err(Errno(libc::ENOSYS)),
        };
        result.into()
    }

    fn init(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let init = args.take::<abi::fuse_init_in>()?;
        if init.major < 7 {
            return Err(Errno(libc::EPROTO));
        }
        // A new session: whatever a previous one held is gone.
        self.clear_dax();
        lock(&self.handles).clear();
        lock(&self.inodes).clear();
        let mut wanted = abi::FUSE_ASYNC_READ | abi::FUSE_BIG_WRITES | abi::FUSE_MAX_PAGES | abi::FUSE_ATOMIC_O_TRUNC;
        if self.dax.is_some() {
            wanted |= abi::FUSE_MAP_ALIGNMENT;
        }
        let map_alignment = if init.flags & wanted & abi::FUSE_MAP_ALIGNMENT != 0 { DAX_PAGE_SHIFT } else { 0 };
        let out = abi::fuse_init_out {
            map_alignment,
            major: abi::FUSE_KERNEL_VERSION,
            minor: abi::FUSE_KERNEL_MINOR_VERSION,
            max_readahead: init.max_readahead,
            flags: init.flags & wanted,
            max_background: 64,
            congestion_threshold: 48,
            max_write: MAX_IO as u32,
            time_gran: 1,
            max_pages: (MAX_IO / 4096) as u16,
            ..Default::default()
        };
        self.initialized.store(true, Ordering::Release);
        Ok(out.as_bytes().to_vec())
    }

    fn batch_forget(&self, args: &mut Args<'_>) {
        let Ok(batch) = args.take::<abi::fuse_batch_forget_in>() else { return };
        let mut inodes = lock(&self.inodes);
        // Bounded by the request's bytes, whatever `count` claims.
        for _ in 0..batch.count {
            let Ok(one) = args.take::<abi::fuse_forget_one>() else { break };
            inodes.forget(one.nodeid, one.nlookup);
        }
    }

    pub(crate) fn inode(&self, node: u64) -> SysResult<std::sync::Arc<Inode>> {
        lock(&self.inodes).get(node)
    }

    pub(crate) fn dir(&self, node: u64) -> SysResult<std::sync::Arc<Inode>> {
        let inode = self.inode(node)?;
        if inode.kind != libc::S_IFDIR {
            return Err(Errno(libc::ENOTDIR));
        }
        Ok(inode)
    }

    pub(crate) fn writable(&self) -> SysResult<()> {
        if self.read_only {
            Err(Errno(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// Looks `name` up in `parent` and counts the lookup: the entry reply.
    pub(crate) fn lookup(&self, parent: u64, name: &[u8]) -> SysResult<Vec<u8>> {
        let dir = self.dir(parent)?;
        let fd = sys::open_beneath(dir.fd.as_fd(), name, libc::O_PATH, 0)?;
        let st = sys::stat(fd.as_fd())?;
        let id = lock(&self.inodes).lookup(fd, (st.st_dev, st.st_ino), st.st_mode & libc::S_IFMT)?;
        Ok(entry(id, &st).as_bytes().to_vec())
    }

    fn getattr(&self, node: u64) -> SysResult<Vec<u8>> {
        let st = sys::stat(self.inode(node)?.fd.as_fd())?;
        Ok(attr_out(&st).as_bytes().to_vec())
    }

    fn setattr(&self, node: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let set = args.take::<abi::fuse_setattr_in>()?;
        let inode = self.inode(node)?;
        let changes = abi::FATTR_MODE
            | abi::FATTR_UID
            | abi::FATTR_GID
            | abi::FATTR_SIZE
            | abi::FATTR_ATIME
            | abi::FATTR_MTIME
            | abi::FATTR_ATIME_NOW
            | abi::FATTR_MTIME_NOW;
        if set.valid & changes != 0 {
            self.writable()?;
        }
        let fd = inode.fd.as_fd();
        if set.valid & abi::FATTR_MODE != 0 {
            if inode.kind == libc::S_IFLNK {
                return Err(Errno(libc::EOPNOTSUPP));
            }
            sys::chmod(fd, set.mode)?;
        }
        if set.valid & (abi::FATTR_UID | abi::FATTR_GID) != 0 {
            let uid = if set.valid & abi::FATTR_UID != 0 { set.uid } else { u32::MAX };
            let gid = if set.valid & abi::FATTR_GID != 0 { set.gid } else { u32::MAX };
            sys::chown(fd, uid, gid)?;
        }
        if set.valid & abi::FATTR_SIZE != 0 {
            if inode.kind != libc::S_IFREG {
                return Err(Errno(libc::EINVAL));
            }
            if set.valid & abi::FATTR_FH != 0 {
                let handle = lock(&self.handles).get(set.fh)?;
                sys::truncate(handle.fd.as_fd(), set.size)?;
            } else {
                let file = sys::reopen(fd, libc::O_WRONLY)?;
                sys::truncate(file.as_fd(), set.size)?;
            }
        }
        let time_bits = abi::FATTR_ATIME | abi::FATTR_MTIME | abi::FATTR_ATIME_NOW | abi::FATTR_MTIME_NOW;
        if set.valid & time_bits != 0 {
            if inode.kind == libc::S_IFLNK {
                return Err(Errno(libc::EOPNOTSUPP));
            }
            let pick = |bit: u32, now: u32, secs: u64, nsec: u32| {
                if set.valid & now != 0 {
                    libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW }
                } else if set.valid & bit != 0 {
                    libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: libc::c_long::from(nsec.min(999_999_999)) }
                } else {
                    libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }
                }
            };
            let times = [
                pick(abi::FATTR_ATIME, abi::FATTR_ATIME_NOW, set.atime, set.atimensec),
                pick(abi::FATTR_MTIME, abi::FATTR_MTIME_NOW, set.mtime, set.mtimensec),
            ];
            sys::set_times(fd, &times)?;
        }
        self.getattr(node)
    }

    fn readlink(&self, node: u64) -> SysResult<Vec<u8>> {
        let inode = self.inode(node)?;
        if inode.kind != libc::S_IFLNK {
            return Err(Errno(libc::EINVAL));
        }
        sys::readlink(inode.fd.as_fd())
    }

    fn symlink(&self, parent: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let name = args.name()?;
        let target = args.string(libc::PATH_MAX as usize)?;
        self.writable()?;
        sys::symlink(target, self.dir(parent)?.fd.as_fd(), name)?;
        self.lookup(parent, name)
    }

    fn mknod(&self, parent: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let mk = args.take::<abi::fuse_mknod_in>()?;
        let name = args.name()?;
        self.writable()?;
        let dir = self.dir(parent)?;
        match mk.mode & libc::S_IFMT {
            libc::S_IFREG => {
                let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
                drop(sys::open_beneath(dir.fd.as_fd(), name, flags, mk.mode)?);
            }
            libc::S_IFIFO | libc::S_IFSOCK => sys::mknod(dir.fd.as_fd(), name, mk.mode)?,
            // Device nodes on the host are never made for a guest.
            _ => return Err(Errno(libc::EPERM)),
        }
        self.lookup(parent, name)
    }

    fn mkdir(&self, parent: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let mk = args.take::<abi::fuse_mkdir_in>()?;
        let name = args.name()?;
        self.writable()?;
        sys::mkdir(self.dir(parent)?.fd.as_fd(), name, mk.mode)?;
        self.lookup(parent, name)
    }

    fn unlink(&self, parent: u64, args: &mut Args<'_>, rmdir: bool) -> SysResult<Vec<u8>> {
        let name = args.name()?;
        self.writable()?;
        sys::unlink(self.dir(parent)?.fd.as_fd(), name, rmdir)?;
        Ok(Vec::new())
    }

    fn rename(&self, parent: u64, args: &mut Args<'_>, with_flags: bool) -> SysResult<Vec<u8>> {
        let (new_dir, flags) = if with_flags {
            let r = args.take::<abi::fuse_rename2_in>()?;
            (r.newdir, r.flags)
        } else {
            (args.take::<abi::fuse_rename_in>()?.newdir, 0)
        };
        let (old, new) = (args.name()?, args.name()?);
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(Errno(libc::EINVAL));
        }
        self.writable()?;
        let (from, to) = (self.dir(parent)?, self.dir(new_dir)?);
        sys::rename(from.fd.as_fd(), old, to.fd.as_fd(), new, flags)?;
        Ok(Vec::new())
    }

    fn link(&self, parent: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let old = args.take::<abi::fuse_link_in>()?.oldnodeid;
        let name = args.name()?;
        self.writable()?;
        let inode = self.inode(old)?;
        if inode.kind == libc::S_IFDIR {
            return Err(Errno(libc::EPERM));
        }
        sys::link(inode.fd.as_fd(), self.dir(parent)?.fd.as_fd(), name)?;
        self.lookup(parent, name)
    }

    fn statfs(&self) -> SysResult<Vec<u8>> {
        let st = sys::statvfs(self.inode(abi::FUSE_ROOT_ID)?.fd.as_fd())?;
        let out = abi::fuse_statfs_out {
            st: abi::fuse_kstatfs {
                blocks: st.f_blocks,
                bfree: st.f_bfree,
                bavail: st.f_bavail,
                files: st.f_files,
                ffree: st.f_ffree,
                bsize: st.f_bsize as u32,
                namelen: st.f_namemax as u32,
                frsize: st.f_frsize as u32,
                ..Default::default()
            },
        };
        Ok(out.as_bytes().to_vec())
    }

    fn access(&self, node: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let mask = args.take::<abi::fuse_access_in>()?.mask as i32;
        if mask & libc::W_OK != 0 {
            self.writable()?;
        }
        let inode = self.inode(node)?;
        if inode.kind == libc::S_IFLNK {
            return Ok(Vec::new());
        }
        sys::access(inode.fd.as_fd(), mask)?;
        Ok(Vec::new())
    }
}

/// `stat` as FUSE attributes.
pub(crate) fn attr(st: &libc::stat64) -> abi::fuse_attr {
    abi::fuse_attr {
        ino: st.st_ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: st.st_atime as u64,
        mtime: st.st_mtime as u64,
        ctime: st.st_ctime as u64,
        atimensec: st.st_atime_nsec as u32,
        mtimensec: st.st_mtime_nsec as u32,
        ctimensec: st.st_ctime_nsec as u32,
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// The entry reply for node `id`.
pub(crate) fn entry(id: u64, st: &libc::stat64) -> abi::fuse_entry_out {
    abi::fuse_entry_out {
        nodeid: id,
        generation: 0,
        entry_valid: CACHE_SECS,
        attr_valid: CACHE_SECS,
        entry_valid_nsec: 0,
        attr_valid_nsec: 0,
        attr: attr(st),
    }
}

fn attr_out(st: &libc::stat64) -> abi::fuse_attr_out {
    abi::fuse_attr_out { attr_valid: CACHE_SECS, attr_valid_nsec: 0, dummy: 0, attr: attr(st) }
}
