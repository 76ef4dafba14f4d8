//! Open files and directories: OPEN/CREATE/OPENDIR hand out handles,
//! READ/WRITE/READDIR/FSYNC/FALLOCATE use them, RELEASE closes them.

use std::os::fd::AsFd;

use fuse_abi::linux as abi;
use zerocopy::IntoBytes;

use crate::request::Args;
use crate::server::{lock, FuseServer, MAX_IO};
use crate::sys::{self, Errno, SysResult};
use crate::tables::Handle;

/// Open flags the guest may pass through; the rest (O_CREAT, O_EXCL,
/// O_NOCTTY, O_DIRECT, O_PATH, ...) are dropped or refused.
const PASSED_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_APPEND
    | libc::O_TRUNC
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_NONBLOCK
    | libc::O_NOATIME;

/// `size_of(fuse_dirent)` without the name.
const DIRENT_LEN: usize = 24;

impl FuseServer {
    fn open_flags(&self, flags: u32) -> SysResult<(i32, bool)> {
        let flags = flags as i32 & PASSED_FLAGS;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            self.writable()?;
        }
        Ok((flags & !libc::O_NOATIME, writes))
    }

    pub(crate) fn open(&self, node: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let open = args.take::<abi::fuse_open_in>()?;
        let inode = self.inode(node)?;
        match inode.kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(Errno(libc::EISDIR)),
            libc::S_IFLNK => return Err(Errno(libc::ELOOP)),
            // FIFOs, sockets, devices: opening them on the host could block
            // the server or reach a host device.
            _ => return Err(Errno(libc::EPERM)),
        }
        let (flags, writable) = self.open_flags(open.flags)?;
        let fd = sys::reopen(inode.fd.as_fd(), flags)?;
        let fh = lock(&self.handles).insert(Handle { fd, writable })?;
        Ok(abi::fuse_open_out { fh, open_flags: 0, backing_id: 0 }.as_bytes().to_vec())
    }

    pub(crate) fn create(&self, parent: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let create = args.take::<abi::fuse_create_in>()?;
        let name = args.name()?;
        self.writable()?;
        let (flags, _) = self.open_flags(create.flags)?;
        let excl = create.flags as i32 & libc::O_EXCL;
        let dir = self.dir(parent)?;
        let fd = sys::open_beneath(dir.fd.as_fd(), name, flags | libc::O_CREAT | excl, create.mode & !create.umask)?;
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let entry_bytes = self.lookup(parent, name)?;
        let fh = lock(&self.handles).insert(Handle { fd, writable })?;
        let mut out = entry_bytes;
        out.extend_from_slice(abi::fuse_open_out { fh, open_flags: 0, backing_id: 0 }.as_bytes());
        Ok(out)
    }

    pub(crate) fn read(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let read = args.take::<abi::fuse_read_in>()?;
        let handle = lock(&self.handles).get(read.fh)?;
        let mut buf = vec![0u8; (read.size as usize).min(MAX_IO)];
        let mut got = 0;
        while got < buf.len() {
            match sys::pread(handle.fd.as_fd(), &mut buf[got..], read.offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(Errno(libc::EINTR)) => continue,
                Err(e) if got == 0 => return Err(e),
                Err(_) => break,
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub(crate) fn write(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let write = args.take::<abi::fuse_write_in>()?;
        let data = args.bytes(write.size as usize)?;
        self.writable()?;
        let handle = lock(&self.handles).get(write.fh)?;
        if !handle.writable {
            return Err(Errno(libc::EBADF));
        }
        let mut done = 0;
        while done < data.len() {
            match sys::pwrite(handle.fd.as_fd(), &data[done..], write.offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(Errno(libc::EINTR)) => continue,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(abi::fuse_write_out { size: done as u32, padding: 0 }.as_bytes().to_vec())
    }

    pub(crate) fn flush(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let flush = args.take::<abi::fuse_flush_in>()?;
        lock(&self.handles).get(flush.fh)?;
        Ok(Vec::new())
    }

    pub(crate) fn release(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let release = args.take::<abi::fuse_release_in>()?;
        lock(&self.handles).remove(release.fh);
        Ok(Vec::new())
    }

    pub(crate) fn fsync(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let fsync = args.take::<abi::fuse_fsync_in>()?;
        let handle = lock(&self.handles).get(fsync.fh)?;
        sys::fsync(handle.fd.as_fd(), fsync.fsync_flags & abi::FUSE_FSYNC_FDATASYNC != 0)?;
        Ok(Vec::new())
    }

    pub(crate) fn fallocate(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let fa = args.take::<abi::fuse_fallocate_in>()?;
        self.writable()?;
        let handle = lock(&self.handles).get(fa.fh)?;
        if !handle.writable {
            return Err(Errno(libc::EBADF));
        }
        sys::fallocate(handle.fd.as_fd(), fa.mode as i32, fa.offset, fa.length)?;
        Ok(Vec::new())
    }

    pub(crate) fn opendir(&self, node: u64) -> SysResult<Vec<u8>> {
        let dir = self.dir(node)?;
        let fd = sys::reopen(dir.fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let fh = lock(&self.handles).insert(Handle { fd, writable: false })?;
        Ok(abi::fuse_open_out { fh, open_flags: 0, backing_id: 0 }.as_bytes().to_vec())
    }

    /// Directory entries from the cookie `offset`, as many as fit `size`.
    pub(crate) fn readdir(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let read = args.take::<abi::fuse_read_in>()?;
        let handle = lock(&self.handles).get(read.fh)?;
        let size = (read.size as usize).min(MAX_IO);
        let mut out = Vec::with_capacity(size);
        for e in sys::read_dir(handle.fd.as_fd(), read.offset, size)? {
            let len = DIRENT_LEN + e.name.len();
            let padded = len.div_ceil(8) * 8;
            if out.len() + padded > size {
                break;
            }
            out.extend_from_slice(&e.ino.to_ne_bytes());
            out.extend_from_slice(&e.next.to_ne_bytes());
            out.extend_from_slice(&(e.name.len() as u32).to_ne_bytes());
            out.extend_from_slice(&u32::from(e.kind).to_ne_bytes());
            out.extend_from_slice(&e.name);
            out.resize(out.len() + padded - len, 0);
        }
        Ok(out)
    }
}
