//! Writing a snapshot: header, tables, then guest RAM with zero pages left as holes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::diff::DiffBase;
use crate::format::{
    encode_tables, Header, RamRegion, SectionKind, ARCH_X86_64, FORMAT_VERSION, HEADER_LEN, PAGE_SIZE,
};
use crate::{Error, Result};
use crc32fast::hash as crc32;

/// What goes into a snapshot besides RAM.
pub struct SnapshotContents<'a> {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// State sections (kind, index, bytes).
    pub sections: Vec<(SectionKind, u32, Vec<u8>)>,
    /// Guest RAM. Nothing may write to it while the snapshot is written.
    pub memory: &'a GuestMemoryMmap<()>,
    /// For a diff snapshot: the parent and the pages to store; `None` stores all.
    pub diff: Option<DiffBase>,
    /// `memory` is anonymous (not mapped from a file): pages never populated
    /// are zero and are skipped without being read (found in /proc/self/pagemap).
    pub anonymous_memory: bool,
}

/// What writing cost.
#[derive(Debug, Clone, Copy)]
pub struct WriteStats {
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// Bytes of RAM actually written (non-zero pages; for a diff, of the changed ones).
    pub ram_written: u64,
    /// Logical file size.
    pub file_size: u64,
    /// Wall time.
    pub duration: Duration,
}

fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> Error + 'p {
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // SAFETY: getentropy (Linux and macOS) writes exactly id.len() (<= 256)
    // bytes into the buffer we own, or fails.
    let rc = unsafe { libc::getentropy(id.as_mut_ptr().cast(), id.len()) };
    if rc != 0 {
        // Fall back to time-derived bytes: the id only distinguishes snapshots.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        id.copy_from_slice(&t.to_le_bytes());
    }
    id
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialised bytes as u64 is valid; align_to handles the
    // unaligned head and tail.
    let (head, body, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes the snapshot to `path` atomically (temporary file, then rename).
pub fn write_snapshot(path: &Path, contents: &SnapshotContents<'_>) -> Result<WriteStats> {
    let start = Instant::now();
    let tmp: PathBuf = {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(format!(".tmp-{}", std::process::id()));
        path.with_file_name(name)
    };
    let result = write_to(&tmp, contents);
    match result {
        Ok(mut stats) => {
            std::fs::rename(&tmp, path).map_err(io_err("renaming the snapshot into place", path))?;
            stats.duration = start.elapsed();
            Ok(stats)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn write_to(path: &Path, contents: &SnapshotContents<'_>) -> Result<WriteStats> {
    let mut file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io_err("creating snapshot file", path))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for r in contents.memory.iter() {
        regions.push(RamRegion { guest_addr: r.start_addr().0, size: r.len(), offset });
        offset += r.len().div_ceil(PAGE_SIZE) * PAGE_SIZE;
    }
    let ram_bytes = offset;
    let diff_sections = match &contents.diff {
        Some(d) if d.pages.pages() != ram_bytes / PAGE_SIZE => {
            return Err(Error::Memory(format!(
                "diff page bitmap covers {} pages, guest RAM has {}",
                d.pages.pages(),
                ram_bytes / PAGE_SIZE
            )))
        }
        Some(d) => vec![(SectionKind::Parent, 0, d.parent_section()), (SectionKind::RamDiff, 0, d.pages.encode())],
        None => Vec::new(),
    };
    let sections: Vec<(SectionKind, u32, &[u8])> =
        contents.sections.iter().chain(&diff_sections).map(|(k, i, b)| (*k, *i, &b[..])).collect();
    let (tables, _) = encode_tables(&regions, &sections);
    let ram_offset = (HEADER_LEN as u64 + tables.len() as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let header = Header {
        version: FORMAT_VERSION,
        arch: ARCH_X86_64,
        vcpu_count: contents.vcpu_count,
        region_count: regions.len() as u32,
        section_count: sections.len() as u32,
        ram_offset,
        tables_len: tables.len() as u64,
        id: random_id(),
        tables_crc: crc32(&tables),
    };
    file.write_all(&header.encode()).map_err(io_err("writing snapshot header", path))?;
    file.write_all(&tables).map_err(io_err("writing snapshot tables", path))?;

    let populated = if contents.anonymous_memory && contents.diff.is_none() {
        Some(crate::diff::populated_pages(contents.memory)?)
    } else {
        None
    };
    let only = contents.diff.as_ref().map(|d| &d.pages).or(populated.as_ref());
    let mut ram_written = 0u64;
    for (region, meta) in contents.memory.iter().zip(&regions) {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(format!("host address of region at {:#x}: {e}", meta.guest_addr)))?;
        // SAFETY: the region maps `len` bytes at `host` for as long as `memory` lives;
        // the caller guarantees nothing writes guest RAM while we read it.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, region.len() as usize) };
        match &only {
            None => ram_written += write_sparse(&file, bytes, ram_offset + meta.offset, path)?,
            Some(selected) => {
                // Only the selected pages (changed ones for a diff, populated ones
                // of anonymous memory); others stay holes. A selected page that is
                // zero stays a hole too, which reads back as zeros.
                let first = meta.offset / PAGE_SIZE;
                let pages = region.len().div_ceil(PAGE_SIZE);
                for (start, count) in selected.runs() {
                    let (lo, hi) = (start.max(first), (start + count).min(first + pages));
                    if lo < hi {
                        let span = &bytes[((lo - first) * PAGE_SIZE) as usize
                            ..(((hi - first) * PAGE_SIZE) as usize).min(bytes.len())];
                        ram_written += write_sparse(&file, span, ram_offset + lo * PAGE_SIZE, path)?;
                    }
                }
            }
        }
    }
    let file_size = ram_offset + ram_bytes;
    file.set_len(file_size).map_err(io_err("sizing snapshot file", path))?;
    Ok(WriteStats { ram_bytes, ram_written, file_size, duration: Duration::ZERO })
}

/// Writes the non-zero pages of `bytes` at `base` in `file`, as runs; returns bytes written.
fn write_sparse(file: &File, bytes: &[u8], base: u64, path: &Path) -> Result<u64> {
    let page = PAGE_SIZE as usize;
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at <= bytes.len() {
        let zero = at == bytes.len() || is_zero(&bytes[at..(at + page).min(bytes.len())]);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(s)) => {
                file.write_all_at(&bytes[s..at], base + s as u64).map_err(io_err("writing guest RAM", path))?;
                written += (at - s) as u64;
                run_start = None;
            }
            _ => {}
        }
        at += page;
    }
    Ok(written)
}
