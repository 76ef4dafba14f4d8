//! The DAX window: a range of host address space the machine maps into the
//! guest as the device's shared-memory region 0 (`VIRTIO_FS_SHMCAP_ID_CACHE`),
//! into which FUSE_SETUPMAPPING maps pages of host files (`MAP_SHARED |
//! MAP_FIXED`) so the guest reads and writes them in place, and
//! FUSE_REMOVEMAPPING puts the inaccessible reservation back.
//!
//! The window is reserved `PROT_NONE` (no memory behind it until a mapping);
//! a guest touching a part it did not map ends its own VM with a vCPU memory
//! fault, nothing else. Every request is checked against the window's bounds
//! with checked arithmetic; offsets and lengths in the window are whole 2 MiB
//! ranges (what Linux maps, `FUSE_DAX_SZ`), so a window holds at most
//! `len / 2 MiB` mappings and a guest cannot make the process run out of
//! mappings. A file is mapped at an address of the kernel's choosing first
//! and then moved over its window range with `mremap(MREMAP_FIXED)`, so a
//! mapping that fails leaves the window as it was. Each mapping keeps the
//! file open, so a snapshot records the file's path as it is then and a
//! restore maps it again.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use fuse_abi::linux as abi;

use crate::request::Args;
use crate::server::{lock, FuseServer};
use crate::sys::{self, Errno, SysResult};

/// Page size of file offsets (what INIT announces as map_alignment).
pub const DAX_PAGE: u64 = 4096;
/// log2 of [`DAX_PAGE`].
pub const DAX_PAGE_SHIFT: u16 = 12;
/// The unit of window offsets and lengths (Linux's `FUSE_DAX_SZ`).
pub const DAX_RANGE: u64 = 2 << 20;

/// One file range mapped into the window.
#[derive(Debug)]
pub struct DaxMapping {
    /// Length in bytes.
    pub len: u64,
    /// Offset in the file.
    pub file_offset: u64,
    /// Mapped writable.
    pub writable: bool,
    /// The file, kept open for as long as it is mapped (a snapshot names it
    /// by its path at that time).
    pub file: OwnedFd,
}

/// The reserved host range and the file ranges mapped into it.
pub struct DaxWindow {
    base: *mut libc::c_void,
    len: u64,
    /// Window offset -> mapping; mappings never overlap.
    mappings: BTreeMap<u64, DaxMapping>,
}

// SAFETY: the window is plain address space owned by this value; every change
// to it goes through `&mut self` (the server holds it behind a mutex).
unsafe impl Send for DaxWindow {}

impl DaxWindow {
    /// Reserves `len` bytes (a multiple of 2 MiB) of host address space.
    pub fn new(len: u64) -> std::io::Result<DaxWindow> {
        if len == 0 || !len.is_multiple_of(2 << 20) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a DAX window of {len} bytes is not a positive multiple of 2 MiB"),
            ));
        }
        let size = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new anonymous reservation; no existing mapping is touched.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DaxWindow { base, len, mappings: BTreeMap::new() })
    }

    /// Host address of the window.
    pub fn host_addr(&self) -> u64 {
        self.base as u64
    }

    /// Its length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.mappings.is_empty()
    }

    /// The mappings, by window offset.
    pub fn mappings(&self) -> impl Iterator<Item = (u64, &DaxMapping)> {
        self.mappings.iter().map(|(&at, m)| (at, m))
    }

    /// `[offset, offset + len)` if it is whole 2 MiB ranges inside the window.
    fn check_range(&self, offset: u64, len: u64) -> SysResult<()> {
        let end = offset.checked_add(len).ok_or(Errno(libc::EINVAL))?;
        if len == 0 || !offset.is_multiple_of(DAX_RANGE) || !len.is_multiple_of(DAX_RANGE) || end > self.len {
            return Err(Errno(libc::EINVAL));
        }
        Ok(())
    }

    /// Maps `mapping.len` bytes of `mapping.file` from `mapping.file_offset`
    /// at window `offset`, replacing whatever was mapped there. On failure
    /// the window is as it was.
    pub fn map(&mut self, offset: u64, mapping: DaxMapping) -> SysResult<()> {
        self.check_range(offset, mapping.len)?;
        if !mapping.file_offset.is_multiple_of(DAX_PAGE) || i64::try_from(mapping.file_offset).is_err() {
            return Err(Errno(libc::EINVAL));
        }
        let prot = libc::PROT_READ | if mapping.writable { libc::PROT_WRITE } else { 0 };
        let len = mapping.len as usize;
        // SAFETY: a new mapping where the kernel chooses; nothing of ours is replaced.
        let staged = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                mapping.file.as_raw_fd(),
                mapping.file_offset as libc::off_t,
            )
        };
        if staged == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        // SAFETY: moves the mapping just made (ours, `len` bytes) over a range
        // inside the reservation this value owns (checked above); the kernel
        // replaces that range atomically.
        let moved = unsafe {
            libc::mremap(
                staged,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                self.base.cast::<u8>().add(offset as usize).cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            let e = Errno::last();
            // SAFETY: the staged mapping is ours and still where mmap put it.
            unsafe { libc::munmap(staged, len) };
            return Err(e);
        }
        self.forget(offset, mapping.len);
        self.mappings.insert(offset, mapping);
        Ok(())
    }

    /// Puts the reservation back over `[offset, offset + len)`.
    pub fn unmap(&mut self, offset: u64, len: u64) -> SysResult<()> {
        self.check_range(offset, len)?;
        self.reserve(offset, len)?;
        self.forget(offset, len);
        Ok(())
    }

    /// Unmaps everything (a new session, or a restore about to map its own).
    pub fn clear(&mut self) -> SysResult<()> {
        if !self.mappings.is_empty() {
            self.reserve(0, self.len)?;
            self.mappings.clear();
        }
        Ok(())
    }

    fn reserve(&mut self, offset: u64, len: u64) -> SysResult<()> {
        // SAFETY: inside the owned reservation (checked by the callers).
        let at = unsafe {
            libc::mmap(
                self.base.cast::<u8>().add(offset as usize).cast(),
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(Errno::last());
        }
        Ok(())
    }

    /// Drops the table entries overlapping `[offset, offset + len)`; the
    /// parts of them outside the range stay mapped but are no longer
    /// recorded, so they are unmapped too (the guest maps and unmaps whole
    /// ranges, so this only happens to a guest that mixes range sizes).
    fn forget(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let overlapping: Vec<u64> =
            self.mappings.range(..end).filter(|(&at, m)| at + m.len > offset).map(|(&at, _)| at).collect();
        for at in overlapping {
            if let Some(m) = self.mappings.remove(&at) {
                let (m_end, cut_end) = (at + m.len, end);
                if at < offset {
                    let _ = self.reserve(at, offset - at);
                }
                if m_end > cut_end {
                    let _ = self.reserve(cut_end, m_end - cut_end);
                }
            }
        }
    }
}

impl Drop for DaxWindow {
    fn drop(&mut self) {
        // SAFETY: the whole reservation this value made; nothing else uses it
        // once the device (and the machine slot over it) is gone.
        unsafe { libc::munmap(self.base, self.len as usize) };
    }
}

impl FuseServer {
    /// The DAX window's host address and length, when the share has one.
    pub fn dax_window(&self) -> Option<(u64, u64)> {
        self.dax.as_ref().map(|w| {
            let w = lock(w);
            (w.host_addr(), w.len())
        })
    }

    /// Unmaps the whole window (a session ends or begins).
    pub(crate) fn clear_dax(&self) {
        if let Some(w) = &self.dax {
            if let Err(e) = lock(w).clear() {
                tracing::warn!("virtio-fs: clearing the DAX window: {e:?}");
            }
        }
    }

    /// FUSE_SETUPMAPPING: maps a range of node `node`'s file (the guest sends
    /// no handle: `fh` is -1) at a window offset.
    pub(crate) fn setup_mapping(&self, node: u64, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let m = args.take::<abi::fuse_setupmapping_in>()?;
        let window = self.dax.as_ref().ok_or(Errno(libc::ENOSYS))?;
        let writable = m.flags & u64::from(abi::FUSE_SETUPMAPPING_FLAG_WRITE) != 0;
        if writable {
            self.writable()?;
        }
        let inode = self.inode(node)?;
        if inode.kind != libc::S_IFREG {
            return Err(Errno(libc::EINVAL));
        }
        let flags = if writable { libc::O_RDWR } else { libc::O_RDONLY };
        let file = sys::reopen(inode.fd.as_fd(), flags)?;
        let mapping = DaxMapping { len: m.len, file_offset: m.foffset, writable, file };
        lock(window).map(m.moffset, mapping)?;
        Ok(Vec::new())
    }

    /// FUSE_REMOVEMAPPING: a count, then that many (offset, length) ranges.
    pub(crate) fn remove_mapping(&self, args: &mut Args<'_>) -> SysResult<Vec<u8>> {
        let head = args.take::<abi::fuse_removemapping_in>()?;
        let window = self.dax.as_ref().ok_or(Errno(libc::ENOSYS))?;
        let mut window = lock(window);
        // Bounded by the request's bytes, whatever `count` claims.
        for _ in 0..head.count {
            let one = args.take::<abi::fuse_removemapping_one>()?;
            window.unmap(one.moffset, one.len)?;
        }
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const R: u64 = DAX_RANGE;

    fn file(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn at(w: &DaxWindow, offset: u64, n: usize) -> Vec<u8> {
        // SAFETY: tests read only ranges they mapped.
        unsafe { std::slice::from_raw_parts((w.host_addr() + offset) as *const u8, n).to_vec() }
    }

    fn mapping(f: &std::fs::File, len: u64, file_offset: u64, writable: bool) -> DaxMapping {
        DaxMapping { len, file_offset, writable, file: OwnedFd::from(f.try_clone().unwrap()) }
    }

    #[test]
    fn file_pages_appear_in_the_window_and_writes_reach_the_file() {
        let mut w = DaxWindow::new(2 * R).unwrap();
        let mut data = vec![b'a'; 8192];
        data[4096..].fill(b'b');
        let f = file(&data);
        w.map(R, mapping(&f, R, 4096, true)).unwrap();
        assert_eq!(at(&w, R, 3), b"bbb");
        // SAFETY: the page was just mapped writable (within the file's size).
        unsafe { *((w.host_addr() + R) as *mut u8) = b'X' };
        let mut back = vec![0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 4096).unwrap();
        assert_eq!(back, b"X");
        assert_eq!(w.mappings().count(), 1);
        w.unmap(R, R).unwrap();
        assert!(w.is_empty());
    }

    #[test]
    fn ranges_outside_the_window_or_not_whole_ranges_are_refused() {
        let mut w = DaxWindow::new(R).unwrap();
        let f = file(&[1u8; 4096]);
        for (offset, len, file_offset) in
            [(R, R, 0), (0, 2 * R, 0), (4096, R, 0), (0, 4096, 0), (0, R, 1), (u64::MAX - (R - 1), R, 0), (0, 0, 0)]
        {
            assert_eq!(
                w.map(offset, mapping(&f, len, file_offset, false)),
                Err(Errno(libc::EINVAL)),
                "{offset} {len} {file_offset}"
            );
        }
        assert!(w.is_empty());
        assert_eq!(w.unmap(!(R - 1), R), Err(Errno(libc::EINVAL)));
        assert!(DaxWindow::new(4096).is_err());
    }

    #[test]
    fn a_failed_mapping_leaves_the_window_as_it_was() {
        let mut w = DaxWindow::new(2 * R).unwrap();
        let a = file(&[b'a'; 4096]);
        w.map(0, mapping(&a, R, 0, false)).unwrap();
        // A writable shared mapping of a file opened read-only: EACCES.
        let ro = std::fs::File::open("/proc/self/exe").unwrap();
        assert_eq!(w.map(0, mapping(&ro, R, 0, true)), Err(Errno(libc::EACCES)));
        assert_eq!(at(&w, 0, 2), b"aa", "the old mapping is still there");
        assert_eq!(w.mappings().count(), 1);
    }

    #[test]
    fn a_new_mapping_replaces_what_it_overlaps() {
        let mut w = DaxWindow::new(4 * R).unwrap();
        let (a, b) = (file(&[b'a'; 16384]), file(&[b'b'; 4096]));
        w.map(0, mapping(&a, 3 * R, 0, false)).unwrap();
        w.map(R, mapping(&b, R, 0, false)).unwrap();
        assert_eq!(at(&w, R, 1), b"b");
        let offsets: Vec<u64> = w.mappings().map(|(at, _)| at).collect();
        assert_eq!(offsets, [R], "the overlapped mapping is gone whole");
        w.clear().unwrap();
        assert!(w.is_empty());
    }
}
