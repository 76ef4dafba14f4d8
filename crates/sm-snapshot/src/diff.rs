//! Diff snapshots: a file that stores only the RAM pages that changed since the
//! snapshot a VM was restored from (its parent), plus full vCPU/device state.
//!
//! Which pages changed comes from the restored VM's own RAM mapping: it maps the
//! parent `MAP_PRIVATE`, so every page written since the restore — by the guest,
//! by KVM or by a device model — is an anonymous copy-on-write page, which
//! `/proc/self/pagemap` tells apart from a page still backed by the file. (KVM's
//! dirty log would miss writes made through the host mapping.)
//!
//! A diff names its parent by path and id; [`SnapshotChain`] opens a diff and its
//! ancestors down to a full snapshot, maps the full one's RAM copy-on-write and
//! copies the diffs' pages over it, oldest first. [`merge_chain`] rewrites a chain
//! as one full snapshot.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

use crate::format::{SectionKind, PAGE_SIZE};
use crate::reader::SnapshotFile;
use crate::writer::{write_snapshot, SnapshotContents, WriteStats};
use crate::{Error, Result};

/// Longest chain of diffs accepted (guards against cycles).
pub const MAX_CHAIN: usize = 64;

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;

/// One bit per page of the RAM area (regions in order, each page-rounded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBitmap {
    pages: u64,
    words: Vec<u64>,
}

impl PageBitmap {
    /// All clear, for `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageBitmap { pages, words: vec![0; pages.div_ceil(64) as usize] }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks page `i`.
    pub fn set(&mut self, i: u64) {
        if i < self.pages {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }

    /// Whether page `i` is marked.
    pub fn get(&self, i: u64) -> bool {
        i < self.pages && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Runs of consecutive marked pages as (first page, page count).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut start = None;
        for i in 0..=self.pages {
            match (i < self.pages && self.get(i), start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    runs.push((s, i - s));
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    /// Section encoding: page count, then the words (little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + self.words.len() * 8);
        b.extend_from_slice(&self.pages.to_le_bytes());
        for w in &self.words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b
    }

    /// Decodes [`PageBitmap::encode`]; `expected_pages` is the RAM area's size.
    pub fn decode(b: &[u8], expected_pages: u64) -> std::result::Result<Self, String> {
        let pages =
            b.get(..8).map(|p| u64::from_le_bytes(p.try_into().expect("8 bytes"))).ok_or("page bitmap is empty")?;
        if pages != expected_pages {
            return Err(format!("page bitmap covers {pages} pages, the RAM area has {expected_pages}"));
        }
        let words = &b[8..];
        if words.len() as u64 != pages.div_ceil(64) * 8 {
            return Err(format!("page bitmap is {} bytes for {pages} pages", b.len()));
        }
        Ok(PageBitmap {
            pages,
            words: words.chunks(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
        })
    }
}

/// Pages of the RAM area (page-rounded regions in order) that `mem` covers.
fn area_pages(mem: &GuestMemoryMmap<()>) -> u64 {
    mem.iter().map(|r| r.len().div_ceil(PAGE_SIZE)).sum()
}

/// The pages of a RAM mapping from [`SnapshotFile::map_ram`] (or
/// [`SnapshotChain::map_ram`]) that were written since it was mapped: those no
/// longer backed by the snapshot file.
pub fn private_pages(mem: &GuestMemoryMmap<()>) -> Result<PageBitmap> {
    // A private copy in RAM (present, not file-backed) or swapped out.
    pagemap_bitmap(mem, |e| (e & PAGEMAP_PRESENT != 0 && e & PAGEMAP_FILE_OR_SHARED == 0) || e & PAGEMAP_SWAPPED != 0)
}

/// The pages of an anonymous RAM mapping that were ever populated (in RAM or
/// swapped out); the others read as zero.
pub fn populated_pages(mem: &GuestMemoryMmap<()>) -> Result<PageBitmap> {
    pagemap_bitmap(mem, |e| e & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0)
}

/// One bit per page of `mem` (regions in order), set where `pick` accepts the
/// page's /proc/self/pagemap entry.
fn pagemap_bitmap(mem: &GuestMemoryMmap<()>, pick: impl Fn(u64) -> bool) -> Result<PageBitmap> {
    let pagemap_path = Path::new("/proc/self/pagemap");
    let pagemap =
        File::open(pagemap_path).map_err(|source| Error::Io { what: "opening", path: pagemap_path.into(), source })?;
    let mut bitmap = PageBitmap::new(area_pages(mem));
    let mut first_page = 0u64;
    for r in mem.iter() {
        let host = r.get_host_address(MemoryRegionAddress(0)).map_err(|e| Error::Memory(e.to_string()))? as u64;
        let pages = r.len().div_ceil(PAGE_SIZE);
        let mut entries = vec![0u8; pages as usize * 8];
        pagemap.read_exact_at(&mut entries, host / PAGE_SIZE * 8).map_err(|source| Error::Io {
            what: "reading",
            path: pagemap_path.into(),
            source,
        })?;
        for (i, e) in entries.chunks_exact(8).enumerate() {
            if pick(u64::from_le_bytes(e.try_into().expect("8 bytes"))) {
                bitmap.set(first_page + i as u64);
            }
        }
        first_page += pages;
    }
    Ok(bitmap)
}

/// A snapshot and its ancestors: `files[0]` is the one opened, the last one is
/// a full snapshot.
pub struct SnapshotChain {
    files: Vec<SnapshotFile>,
    /// Pages stored by each diff (parallel to `files`, `None` for the full one).
    diffs: Vec<Option<PageBitmap>>,
}

impl SnapshotChain {
    /// Opens `path` and, for a diff, its parents (each verified by id and RAM
    /// layout); a relative parent path is relative to the diff's directory.
    pub fn open(path: &Path) -> Result<Self> {
        let mut files: Vec<SnapshotFile> = Vec::new();
        let mut diffs = Vec::new();
        let mut next: Option<(PathBuf, Option<[u8; 16]>)> = Some((path.to_path_buf(), None));
        while let Some((p, expected_id)) = next.take() {
            if files.len() == MAX_CHAIN {
                return Err(Error::Invalid {
                    path: path.into(),
                    reason: format!("more than {MAX_CHAIN} diffs deep (a cycle?)"),
                });
            }
            let f = SnapshotFile::open(&p)?;
            let invalid = |reason: String| Error::Invalid { path: p.clone(), reason };
            if let Some(id) = expected_id {
                if f.id() != id {
                    return Err(invalid(format!(
                        "it is not the parent {} was taken from (the file was replaced): restore a full snapshot or merge the chain before replacing files",
                        files.last().map_or(String::new(), |c| c.path().display().to_string())
                    )));
                }
            }
            if let Some(child) = files.last() {
                if child.regions() != f.regions() || child.vcpu_count() != f.vcpu_count() {
                    return Err(invalid("its RAM layout differs from its diff's".into()));
                }
            }
            let pages = f.regions().iter().map(|r| r.size.div_ceil(PAGE_SIZE)).sum();
            match (f.section(SectionKind::Parent, 0), f.section(SectionKind::RamDiff, 0)) {
                (None, None) => diffs.push(None),
                (Some(parent), Some(bitmap)) => {
                    if parent.len() < 17 {
                        return Err(invalid("parent section is malformed".into()));
                    }
                    let id: [u8; 16] = parent[..16].try_into().expect("16 bytes");
                    let parent_path = PathBuf::from(
                        std::str::from_utf8(&parent[16..]).map_err(|_| invalid("parent path is not UTF-8".into()))?,
                    );
                    let parent_path = match (parent_path.is_absolute(), p.parent()) {
                        (false, Some(dir)) => dir.join(parent_path),
                        _ => parent_path,
                    };
                    diffs.push(Some(PageBitmap::decode(bitmap, pages).map_err(invalid)?));
                    next = Some((parent_path, Some(id)));
                }
                _ => return Err(invalid("a diff needs both its parent and page-bitmap sections".into())),
            }
            files.push(f);
        }
        Ok(SnapshotChain { files, diffs })
    }

    /// The snapshot opened (its state sections describe the VM).
    pub fn top(&self) -> &SnapshotFile {
        &self.files[0]
    }

    /// Number of files (1 for a full snapshot).
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Always false: a chain has at least one file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Guest RAM as of the top snapshot: the full snapshot mapped copy-on-write,
    /// then the diffs' pages copied over it (they become private pages).
    pub fn map_ram(&self) -> Result<GuestMemoryMmap<()>> {
        let mem = self.files.last().expect("a chain has a full snapshot").map_ram()?;
        self.apply_diffs(&mem)?;
        Ok(mem)
    }

    /// Like [`SnapshotChain::map_ram`], over existing mappings (see
    /// [`SnapshotFile::map_ram_at`]).
    ///
    /// # Safety
    /// As for [`SnapshotFile::map_ram_at`].
    pub unsafe fn map_ram_at(&self, bases: &[*mut u8]) -> Result<GuestMemoryMmap<()>> {
        // SAFETY: forwarded from the caller.
        let mem = unsafe { self.files.last().expect("a chain has a full snapshot").map_ram_at(bases)? };
        self.apply_diffs(&mem)?;
        Ok(mem)
    }

    /// Copies every diff's pages into `mem` (mapped from the full snapshot),
    /// oldest diff first. Used after mapping and after a reset in place.
    pub fn apply_diffs(&self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        for (file, bitmap) in self.files.iter().zip(&self.diffs).rev() {
            if let Some(bitmap) = bitmap {
                copy_pages(file, bitmap, mem)?;
            }
        }
        Ok(())
    }
}

/// Reads the pages `bitmap` marks from `file`'s RAM area into `mem`.
fn copy_pages(file: &SnapshotFile, bitmap: &PageBitmap, mem: &GuestMemoryMmap<()>) -> Result<()> {
    let mut bases = Vec::new(); // (first page, host address, page count) per region
    let mut first = 0u64;
    for r in mem.iter() {
        let host = r.get_host_address(MemoryRegionAddress(0)).map_err(|e| Error::Memory(e.to_string()))?;
        let pages = r.len().div_ceil(PAGE_SIZE);
        bases.push((first, host, pages));
        first += pages;
    }
    for (start, count) in bitmap.runs() {
        let mut page = start;
        while page < start + count {
            let &(base, host, pages) = bases
                .iter()
                .find(|(b, _, n)| page >= *b && page < b + n)
                .ok_or_else(|| Error::Memory(format!("page {page} is outside guest RAM")))?;
            let n = (start + count).min(base + pages) - page;
            // SAFETY: [host + (page - base) * 4 KiB, + n pages) lies inside one
            // region mapping owned by `mem` (n is clipped to the region), and the
            // VM is not running while its RAM is restored.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(host.add(((page - base) * PAGE_SIZE) as usize), (n * PAGE_SIZE) as usize)
            };
            file.read_ram_at(dst, page * PAGE_SIZE)?;
            page += n;
        }
    }
    Ok(())
}

/// Rewrites the chain ending at `diff` as one full snapshot at `out`.
pub fn merge_chain(diff: &Path, out: &Path) -> Result<WriteStats> {
    let chain = SnapshotChain::open(diff)?;
    let mem = chain.map_ram()?;
    let top = chain.top();
    let sections = top
        .all_sections()
        .into_iter()
        .filter(|(k, _, _)| !matches!(k, SectionKind::Parent | SectionKind::RamDiff))
        .map(|(k, i, b)| (k, i, b.to_vec()))
        .collect();
    write_snapshot(
        out,
        &SnapshotContents { vcpu_count: top.vcpu_count(), sections, memory: &mem, diff: None, anonymous_memory: false },
    )
}

/// What makes a snapshot a diff: its parent and the pages it stores.
pub struct DiffBase {
    /// The parent's path, as stored (absolute is safest).
    pub parent: PathBuf,
    /// The parent's id ([`SnapshotFile::id`]).
    pub parent_id: [u8; 16],
    /// The pages to store (from [`private_pages`]).
    pub pages: PageBitmap,
}

impl DiffBase {
    /// The diff of a VM whose RAM was mapped from `parent`, as of now.
    pub fn of(parent: &SnapshotFile, mem: &GuestMemoryMmap<()>) -> Result<Self> {
        let path = std::fs::canonicalize(parent.path()).unwrap_or_else(|_| parent.path().to_path_buf());
        Ok(DiffBase { parent: path, parent_id: parent.id(), pages: private_pages(mem)? })
    }

    /// The parent section's bytes.
    pub(crate) fn parent_section(&self) -> Vec<u8> {
        let mut b = self.parent_id.to_vec();
        b.extend_from_slice(self.parent.to_string_lossy().as_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs_encoding_and_rejections() {
        let mut b = PageBitmap::new(130);
        for i in [0, 1, 2, 64, 129] {
            b.set(i);
        }
        b.set(500); // out of range: ignored
        assert_eq!(b.count(), 5);
        assert_eq!(b.runs(), vec![(0, 3), (64, 1), (129, 1)]);
        let e = b.encode();
        assert_eq!(PageBitmap::decode(&e, 130).unwrap(), b);
        assert!(PageBitmap::decode(&e, 131).unwrap_err().contains("131"));
        assert!(PageBitmap::decode(&e[..e.len() - 1], 130).is_err());
        assert!(PageBitmap::decode(&[], 130).is_err());
    }
}
