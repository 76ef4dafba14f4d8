//! The host side of a virtio-blk disk: the backing file and positional I/O
//! straight between the file and guest memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::{BlockError, ID_BYTES, SECTOR_SIZE};
use crate::GuestMemory;

/// An open disk image.
pub(crate) struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    /// Size in 512-byte sectors.
    capacity: u64,
    id: [u8; ID_BYTES],
}

impl Disk {
    pub(crate) fn open(path: &Path, read_only: bool, id: Option<String>) -> Result<Disk, BlockError> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            read_only,
            source,
        })?;
        let meta = file.metadata().map_err(|source| BlockError::Size { path: path.to_path_buf(), source })?;
        if meta.is_dir() {
            return Err(BlockError::NotADisk { path: path.to_path_buf() });
        }
        lock(&file, path, read_only)?;
        // Seeking to the end works for regular files and block devices alike.
        let bytes =
            (&file).seek(SeekFrom::End(0)).map_err(|source| BlockError::Size { path: path.to_path_buf(), source })?;
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                path = %path.display(),
                bytes,
                "disk image size is not a multiple of 512; the trailing partial sector is not visible to the guest"
            );
        }
        let id = match id {
            Some(id) => {
                if id.len() > ID_BYTES {
                    return Err(BlockError::IdTooLong { id });
                }
                let mut out = [0u8; ID_BYTES];
                out[..id.len()].copy_from_slice(id.as_bytes());
                out
            }
            None => default_id(&meta),
        };
        Ok(Disk { file, path: path.to_path_buf(), read_only, capacity: bytes / SECTOR_SIZE, id })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    pub(crate) fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Fills guest memory `[addr, addr + len)` from the file at `offset`.
    pub(crate) fn read_to_guest(
        &self,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut src = FileAt { file: &self.file, offset };
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let mut slice = slice.map_err(io::Error::other)?;
            src.read_exact_volatile(&mut slice).map_err(volatile_to_io)?;
        }
        Ok(())
    }

    /// Writes guest memory `[addr, addr + len)` to the file at `offset`.
    pub(crate) fn write_from_guest(
        &self,
        mem: &GuestMemory,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut dst = FileAt { file: &self.file, offset };
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            dst.write_all_volatile(&slice).map_err(volatile_to_io)?;
        }
        Ok(())
    }

    /// Makes written data durable (fdatasync).
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// One writer or many readers per image, across processes: a disk written
/// by two VMs at once (or written by one while another reads it) is
/// corrupted, so the second open is refused instead. The lock (flock) lives
/// as long as the open file, i.e. the device.
fn lock(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let op = if read_only { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock on a valid fd owned by `file` for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(BlockError::InUse { path: path.to_path_buf(), read_only });
    }
    Err(BlockError::Open { path: path.to_path_buf(), read_only, source })
}

/// A stable serial for disks created without an id: device, inode, and the
/// special-file device number, like other VMMs do.
fn default_id(meta: &std::fs::Metadata) -> [u8; ID_BYTES] {
    let s = format!("{}{}{}", meta.dev(), meta.rdev(), meta.ino());
    let mut out = [0u8; ID_BYTES];
    let n = s.len().min(ID_BYTES);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

fn volatile_to_io(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other),
    }
}

/// A file with a cursor that only this value advances: pread/pwrite, so
/// concurrent users of the same file never race on the shared file offset.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl FileAt<'_> {
    fn off(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset).map_err(|_| {
            VolatileMemoryError::IOError(io::Error::new(io::ErrorKind::InvalidInput, "file offset too large"))
        })
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(&mut self, buf: &mut VolatileSlice<B>) -> Result<usize, VolatileMemoryError> {
        let off = self.off()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: the descriptor is open for the lifetime of `self.file`; the
        // destination is the volatile slice's memory, valid for `buf.len()` bytes
        // of writes while `guard` lives (VolatileSlice invariant). Guest memory is
        // never borrowed as a Rust reference, so the kernel writing into it
        // aliases nothing.
        let n = unsafe { libc::pread(self.file.as_raw_fd(), guard.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            // A failed read may still have written part of the buffer.
            buf.bitmap().mark_dirty(0, buf.len());
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        let n = n as usize;
        buf.bitmap().mark_dirty(0, n);
        self.offset += n as u64;
        Ok(n)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(&mut self, buf: &VolatileSlice<B>) -> Result<usize, VolatileMemoryError> {
        let off = self.off()?;
        let guard = buf.ptr_guard();
        // SAFETY: the descriptor is open for the lifetime of `self.file`; the
        // source is the volatile slice's memory, valid for `buf.len()` bytes of
        // reads while `guard` lives (VolatileSlice invariant); the kernel only
        // reads it.
        let n = unsafe { libc::pwrite(self.file.as_raw_fd(), guard.as_ptr().cast(), buf.len(), off) };
        if n < 0 {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        }
        self.offset += n as u64;
        Ok(n as usize)
    }
}
