//! Reading a snapshot: metadata without RAM, and RAM mapped copy-on-write.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::format::{decode_tables, Header, HeaderError, RamRegion, SectionEntry, SectionKind, HEADER_LEN};
use crate::{Error, Result};
use crc32fast::hash as crc32;

/// An open snapshot file: header, RAM layout and state sections in memory, RAM
/// left on disk until mapped.
pub struct SnapshotFile {
    path: PathBuf,
    file: Arc<File>,
    header: Header,
    regions: Vec<RamRegion>,
    sections: Vec<SectionEntry>,
    tables: Vec<u8>,
}

impl SnapshotFile {
    /// Opens and validates `path` (header, checksums, that RAM is all there).
    pub fn open(path: &Path) -> Result<Self> {
        let invalid = |reason: String| Error::Invalid { path: path.to_path_buf(), reason };
        let mut file = File::open(path).map_err(|source| Error::Io {
            what: "opening snapshot",
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| Error::Io { what: "reading snapshot size of", path: path.to_path_buf(), source })?
            .len();
        let mut hb = Vec::with_capacity(HEADER_LEN);
        (&mut file).take(HEADER_LEN as u64).read_to_end(&mut hb).map_err(|source| Error::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        let header = Header::decode(&hb).map_err(|e| match e {
            HeaderError::Truncated(n) => invalid(format!("truncated: {n} bytes, shorter than the header")),
            HeaderError::Magic => invalid("not a supermachine snapshot (bad magic)".into()),
            HeaderError::Version(found) => Error::Version { path: path.to_path_buf(), found },
            HeaderError::Checksum => invalid("header checksum mismatch (file damaged)".into()),
            HeaderError::Fields(reason) => invalid(reason),
        })?;
        let mut tables = Vec::with_capacity(header.tables_len as usize);
        (&mut file).take(header.tables_len).read_to_end(&mut tables).map_err(|source| Error::Io {
            what: "reading",
            path: path.to_path_buf(),
            source,
        })?;
        if tables.len() as u64 != header.tables_len {
            return Err(invalid(format!(
                "truncated in its metadata ({} of {} bytes)",
                tables.len(),
                header.tables_len
            )));
        }
        let (regions, sections) = decode_tables(&header, &tables).map_err(invalid)?;
        for s in &sections {
            let start = (s.offset - HEADER_LEN as u64) as usize;
            if crc32(&tables[start..start + s.len as usize]) != s.crc {
                return Err(invalid(format!("section {:?}/{} checksum mismatch (file damaged)", s.kind, s.index)));
            }
        }
        // decode_tables checked that offset + size + ram_offset does not wrap.
        let ram_end = regions.iter().map(|r| r.offset + r.size).max().unwrap_or(0) + header.ram_offset;
        if len < ram_end {
            return Err(invalid(format!("truncated: {len} bytes, guest RAM needs {ram_end}")));
        }
        Ok(SnapshotFile { path: path.to_path_buf(), file: Arc::new(file), header, regions, sections, tables })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Random id of this snapshot.
    pub fn id(&self) -> [u8; 16] {
        self.header.id
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        self.header.vcpu_count
    }

    /// Guest RAM regions.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total guest RAM bytes.
    pub fn ram_size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// The bytes of section (`kind`, `index`), if present.
    pub fn section(&self, kind: SectionKind, index: u32) -> Option<&[u8]> {
        self.sections.iter().find(|s| s.kind == kind && s.index == index).map(|s| self.bytes(s))
    }

    /// All sections of `kind`, by index.
    pub fn sections_of(&self, kind: SectionKind) -> Vec<(u32, &[u8])> {
        let mut v: Vec<(u32, &[u8])> =
            self.sections.iter().filter(|s| s.kind == kind).map(|s| (s.index, self.bytes(s))).collect();
        v.sort_by_key(|(i, _)| *i);
        v
    }

    /// Every section as (kind, index, bytes), in file order.
    pub fn all_sections(&self) -> Vec<(SectionKind, u32, &[u8])> {
        self.sections.iter().map(|s| (s.kind, s.index, self.bytes(s))).collect()
    }

    /// Reads `buf.len()` bytes of the RAM area at `offset` (holes read as zeros).
    pub fn read_ram_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(buf, self.header.ram_offset + offset).map_err(|source| Error::Io {
            what: "reading guest RAM from",
            path: self.path.clone(),
            source,
        })
    }

    fn bytes(&self, s: &SectionEntry) -> &[u8] {
        let start = (s.offset - HEADER_LEN as u64) as usize;
        &self.tables[start..start + s.len as usize]
    }

    /// Maps guest RAM from the file, private and copy-on-write: nothing is read until
    /// the guest touches a page, guest writes stay in this process, and every VM
    /// mapped from the same file shares the clean pages through the page cache.
    pub fn map_ram(&self) -> Result<GuestMemoryMmap<()>> {
        let mut regions = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let file = self.file.try_clone().map_err(|e| Error::Memory(format!("duplicating snapshot fd: {e}")))?;
            let offset = FileOffset::new(file, self.header.ram_offset + r.offset);
            let mapping = MmapRegion::build(
                Some(offset),
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
            .map_err(|e| Error::Memory(format!("mapping {} bytes of {}: {e}", r.size, self.path.display())))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or_else(|| Error::Memory(format!("region at {:#x} overflows", r.guest_addr)))?;
            regions.push(region);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Memory(format!("{e}")))
    }
}

impl SnapshotFile {
    /// Like [`SnapshotFile::map_ram`], but maps each region over the existing
    /// mapping at `bases[i]` (`MAP_FIXED`), e.g. RAM already registered with a VM.
    /// The returned memory does not own the mappings (dropping it unmaps nothing).
    ///
    /// # Safety
    /// Each `bases[i]` must be the page-aligned start of a mapping of this
    /// process at least as long as region `i`, that nothing else uses while it
    /// is replaced, and that outlives the returned memory.
    pub unsafe fn map_ram_at(&self, bases: &[*mut u8]) -> Result<GuestMemoryMmap<()>> {
        if bases.len() != self.regions.len() {
            return Err(Error::Memory(format!("{} bases for {} RAM regions", bases.len(), self.regions.len())));
        }
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        let mut regions = Vec::with_capacity(self.regions.len());
        for (r, &base) in self.regions.iter().zip(bases) {
            let offset = i64::try_from(self.header.ram_offset + r.offset)
                .map_err(|_| Error::Memory("offset too large".into()))?;
            // SAFETY: the caller guarantees `base` starts a mapping of at least
            // `r.size` bytes that may be replaced; MAP_FIXED replaces exactly it.
            let addr = unsafe {
                libc::mmap(
                    base.cast(),
                    r.size as usize,
                    prot,
                    flags | libc::MAP_FIXED,
                    std::os::fd::AsRawFd::as_raw_fd(&*self.file),
                    offset,
                )
            };
            if addr == libc::MAP_FAILED || addr.cast::<u8>() != base {
                return Err(Error::Memory(format!(
                    "mapping {} over existing RAM: {}",
                    self.path.display(),
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: [base, base + size) is the mapping just made with these
            // prot/flags; the caller keeps it alive longer than the region.
            let mapping = unsafe { MmapRegion::build_raw(base, r.size as usize, prot, flags) }
                .map_err(|e| Error::Memory(format!("{e}")))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
                .ok_or_else(|| Error::Memory(format!("region at {:#x} overflows", r.guest_addr)))?;
            regions.push(region);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Memory(format!("{e}")))
    }
}

/// Drops every private (written) page of a RAM mapping from [`SnapshotFile::map_ram`],
/// so the guest sees the snapshot's contents again: reset in place.
pub fn discard_private_pages(mem: &GuestMemoryMmap<()>) -> Result<()> {
    for r in mem.iter() {
        let host = r.get_host_address(MemoryRegionAddress(0)).map_err(|e| Error::Memory(e.to_string()))?;
        // SAFETY: the range is exactly one mapping owned by `mem`; MADV_DONTNEED on a
        // private file mapping drops private copies, leaving the mapping valid.
        let rc = unsafe { libc::madvise(host.cast(), r.len() as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(Error::Memory(format!("madvise(DONTNEED): {}", std::io::Error::last_os_error())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
