//! The host system calls the server makes, each relative to a directory fd
//! of the share (never an absolute host path), returning `Errno` on failure.
//!
//! Containment rests on three rules kept here: names are single components
//! (checked by the caller: no `/`, not `.` or `..`); every lookup and create
//! is `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS` and `O_NOFOLLOW`, so a symlink is opened as itself
//! and never followed on the host; and a file is reopened for I/O only
//! through `/proc/self/fd/N` of its own `O_PATH` fd after its type was checked
//! to be a regular file or a directory.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A negative-errno style error, as FUSE replies carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's last OS error.
    pub fn last() -> Errno {
        Errno(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Result of a host call.
pub type SysResult<T> = Result<T, Errno>;

fn check(rc: libc::c_int) -> SysResult<libc::c_int> {
    if rc < 0 {
        Err(Errno::last())
    } else {
        Ok(rc)
    }
}

fn cstring(name: &[u8]) -> SysResult<CString> {
    CString::new(name).map_err(|_| Errno(libc::EINVAL))
}

const RESOLVE: u64 = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)` confined beneath `dir`.
pub fn open_beneath(dir: BorrowedFd<'_>, name: &[u8], flags: i32, mode: u32) -> SysResult<OwnedFd> {
    let name = cstring(name)?;
    let how = OpenHow {
        flags: (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: if flags & libc::O_CREAT != 0 { u64::from(mode & 0o7777) } else { 0 },
        resolve: RESOLVE,
    };
    // SAFETY: `name` is NUL-terminated and `how` a valid open_how (three u64s), both alive
    // for the call; the size passed is the struct's.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            name.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The `O_PATH` fd of the share's root directory.
pub fn open_root(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the shared directory's path"))?;
    // SAFETY: a NUL-terminated path alive for the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopens the inode behind an `O_PATH` fd with `flags` (through
/// `/proc/self/fd`, which names exactly that inode). The caller checked it is
/// a regular file or directory.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> SysResult<OwnedFd> {
    let path = proc_path(fd);
    // SAFETY: a NUL-terminated path alive for the call.
    let new = check(unsafe { libc::open(path.as_ptr(), (flags | libc::O_CLOEXEC) & !libc::O_CREAT) })?;
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// `/proc/self/fd/N` of `fd`.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// `fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW)`.
pub fn stat(fd: BorrowedFd<'_>) -> SysResult<libc::stat64> {
    let mut st = std::mem::MaybeUninit::<libc::stat64>::zeroed();
    // SAFETY: "" is a valid C string; `st` is writable storage for a stat64.
    check(unsafe {
        libc::fstatat64(fd.as_raw_fd(), c"".as_ptr(), st.as_mut_ptr(), libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    })?;
    // SAFETY: fstatat64 succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `fstatvfs` of the share.
pub fn statvfs(fd: BorrowedFd<'_>) -> SysResult<libc::statvfs64> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs64>::zeroed();
    // SAFETY: a valid fd and writable storage for a statvfs64.
    check(unsafe { libc::fstatvfs64(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs64 succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// `readlinkat(fd, "")`: the target of the symlink `fd` is.
pub fn readlink(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: "" is a valid C string and `buf` writable for its length.
    let n = unsafe { libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(Errno::last());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The host path the kernel has for the inode behind `fd` (the link
/// `/proc/self/fd/N`): what a snapshot records to reopen it by. Not a path
/// the server ever opens as such; restore goes through [`open_beneath`].
pub fn fd_path(fd: BorrowedFd<'_>) -> SysResult<Vec<u8>> {
    let link = proc_path(fd);
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `link` is NUL-terminated and `buf` writable for its length.
    let n = unsafe { libc::readlink(link.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(Errno::last());
    }
    if n as usize >= buf.len() {
        // Possibly cut short: not a name to reopen by.
        return Err(Errno(libc::ENAMETOOLONG));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `fcntl(fd, F_GETFL)`: the open file's status flags.
pub fn status_flags(fd: BorrowedFd<'_>) -> SysResult<i32> {
    // SAFETY: F_GETFL takes no argument; the fd is valid for the call.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })
}

/// `mkdirat`.
pub fn mkdir(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> SysResult<()> {
    let name = cstring(name)?;
    // SAFETY: a NUL-terminated name alive for the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777) }).map(drop)
}

/// `mknodat` (the caller allows only fifos and sockets).
pub fn mknod(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> SysResult<()> {
    let name = cstring(name)?;
    // SAFETY: a NUL-terminated name alive for the call.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

/// `symlinkat(target, dir, name)`: the target is stored, never resolved here.
pub fn symlink(target: &[u8], dir: BorrowedFd<'_>, name: &[u8]) -> SysResult<()> {
    let (target, name) = (cstring(target)?, cstring(name)?);
    // SAFETY: NUL-terminated strings alive for the call.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `unlinkat` (`AT_REMOVEDIR` for `rmdir`).
pub fn unlink(dir: BorrowedFd<'_>, name: &[u8], rmdir: bool) -> SysResult<()> {
    let name = cstring(name)?;
    let flags = if rmdir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: a NUL-terminated name alive for the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `renameat2` between two directories of the share.
pub fn rename(old_dir: BorrowedFd<'_>, old: &[u8], new_dir: BorrowedFd<'_>, new: &[u8], flags: u32) -> SysResult<()> {
    let (old, new) = (cstring(old)?, cstring(new)?);
    // SAFETY: NUL-terminated names alive for the call.
    check(unsafe { libc::renameat2(old_dir.as_raw_fd(), old.as_ptr(), new_dir.as_raw_fd(), new.as_ptr(), flags) })
        .map(drop)
}

/// A hard link to the inode behind `fd` (by its `/proc/self/fd` name) at `dir/name`.
pub fn link(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &[u8]) -> SysResult<()> {
    let (from, name) = (proc_path(fd), cstring(name)?);
    // SAFETY: NUL-terminated strings alive for the call.
    check(unsafe {
        libc::linkat(libc::AT_FDCWD, from.as_ptr(), dir.as_raw_fd(), name.as_ptr(), libc::AT_SYMLINK_FOLLOW)
    })
    .map(drop)
}

/// `fchmodat` of the inode behind `fd`.
pub fn chmod(fd: BorrowedFd<'_>, mode: u32) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: a NUL-terminated path alive for the call.
    check(unsafe { libc::fchmodat(libc::AT_FDCWD, path.as_ptr(), mode & 0o7777, 0) }).map(drop)
}

/// `fchownat(fd, "", AT_EMPTY_PATH)`; `u32::MAX` leaves an id as it is.
pub fn chown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> SysResult<()> {
    // SAFETY: "" is a valid C string.
    check(unsafe {
        libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    })
    .map(drop)
}

/// `utimensat` of the inode behind `fd`.
pub fn set_times(fd: BorrowedFd<'_>, times: &[libc::timespec; 2]) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: a NUL-terminated path and two timespecs alive for the call.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

/// `ftruncate`.
pub fn truncate(fd: BorrowedFd<'_>, size: u64) -> SysResult<()> {
    let size = i64::try_from(size).map_err(|_| Errno(libc::EFBIG))?;
    // SAFETY: a valid fd.
    check(unsafe { libc::ftruncate64(fd.as_raw_fd(), size) }).map(drop)
}

/// `pread` into `buf`; returns the bytes read.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> SysResult<usize> {
    let offset = i64::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::pread64(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

/// `pwrite` of `data`; returns the bytes written.
pub fn pwrite(fd: BorrowedFd<'_>, data: &[u8], offset: u64) -> SysResult<usize> {
    let offset = i64::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: `data` is readable for its length.
    let n = unsafe { libc::pwrite64(fd.as_raw_fd(), data.as_ptr().cast(), data.len(), offset) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

/// `fsync` or `fdatasync`.
pub fn fsync(fd: BorrowedFd<'_>, data_only: bool) -> SysResult<()> {
    // SAFETY: a valid fd.
    check(unsafe {
        if data_only {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

/// `fallocate`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> SysResult<()> {
    let (offset, len) =
        (i64::try_from(offset).map_err(|_| Errno(libc::EINVAL))?, i64::try_from(len).map_err(|_| Errno(libc::EINVAL))?);
    // SAFETY: a valid fd.
    check(unsafe { libc::fallocate64(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

/// `faccessat` of the inode behind `fd`.
pub fn access(fd: BorrowedFd<'_>, mask: i32) -> SysResult<()> {
    let path = proc_path(fd);
    // SAFETY: a NUL-terminated path alive for the call.
    check(unsafe { libc::faccessat(libc::AT_FDCWD, path.as_ptr(), mask, 0) }).map(drop)
}

/// One entry of a directory read.
pub struct DirEntry {
    /// Inode number.
    pub ino: u64,
    /// The cookie that continues the listing after this entry.
    pub next: u64,
    /// `DT_*` type.
    pub kind: u8,
    /// The name.
    pub name: Vec<u8>,
}

/// Reads entries of the open directory `fd` from cookie `offset`, at most
/// `buf_len` bytes of raw dirents.
pub fn read_dir(fd: BorrowedFd<'_>, offset: u64, buf_len: usize) -> SysResult<Vec<DirEntry>> {
    let off = i64::try_from(offset).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: a valid fd.
    if unsafe { libc::lseek64(fd.as_raw_fd(), off, libc::SEEK_SET) } < 0 {
        return Err(Errno::last());
    }
    let mut buf = vec![0u8; buf_len.max(1024)];
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        return Err(Errno::last());
    }
    let mut entries = Vec::new();
    let mut at = 0usize;
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    while at + 19 <= n as usize {
        let rec = &buf[at..n as usize];
        let ino = u64::from_ne_bytes(rec[0..8].try_into().expect("8 bytes"));
        let next = u64::from_ne_bytes(rec[8..16].try_into().expect("8 bytes"));
        let reclen = usize::from(u16::from_ne_bytes([rec[16], rec[17]]));
        if reclen < 19 || reclen > rec.len() {
            break;
        }
        let name = CStr::from_bytes_until_nul(&rec[19..reclen]).map(CStr::to_bytes).unwrap_or(&rec[19..reclen]);
        entries.push(DirEntry { ino, next, kind: rec[18], name: name.to_vec() });
        at += reclen;
    }
    Ok(entries)
}
