//! The balloon's queue handling: inflate (release guest pages to the host),
//! deflate (acknowledge) and statistics (keep the latest report, hold the buffer
//! until the host wants a new one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::BalloonStats;
use crate::worker::{add_used, drain_queue, needs_notification};
use crate::GuestMemory;

/// The balloon protocol's page size (VIRTIO_BALLOON_PFN_SHIFT = 12).
pub const BALLOON_PAGE_SIZE: u64 = 4096;
/// PFNs read from one inflate/deflate buffer (Linux sends at most 256).
const MAX_PFNS_PER_REQUEST: usize = 4096;
/// Bytes of one statistics entry: le16 tag, le64 value (packed).
const STAT_ENTRY_LEN: usize = 10;
/// Statistics entries read from one report.
const MAX_STATS: usize = 256;

/// Reads up to `limit` bytes from the chain's device-readable descriptors;
/// unreadable descriptors are skipped.
fn gather_readable(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for desc in chain.readable() {
        let n = (desc.len() as usize).min(limit - out.len());
        if n == 0 {
            if out.len() == limit {
                break;
            }
            continue;
        }
        let start = out.len();
        out.resize(start + n, 0);
        if let Err(e) = mem.read_slice(&mut out[start..], desc.addr()) {
            tracing::debug!("virtio-balloon: unreadable descriptor {:#x}+{n:#x}: {e}", desc.addr().0);
            out.truncate(start);
        }
    }
    out
}

fn read_pfns(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Vec<u32> {
    gather_readable(mem, chain, MAX_PFNS_PER_REQUEST * 4)
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Handles the inflate queue: every PFN inside guest memory is given back to the
/// host. Returns whether the driver must be interrupted.
pub(crate) fn process_inflate(mem: &GuestMemory, queue: &mut Queue) -> bool {
    drain_queue(mem, queue, |chain| {
        let pfns = read_pfns(mem, chain);
        let released = release_pages(mem, &pfns);
        tracing::trace!(pfns = pfns.len(), released, "virtio-balloon: inflate");
        Some(0)
    })
}

/// Handles the deflate queue: the guest takes pages back; nothing to do on the
/// host (the next touch faults a zero page in). Returns whether to interrupt.
pub(crate) fn process_deflate(mem: &GuestMemory, queue: &mut Queue) -> bool {
    drain_queue(mem, queue, |chain| {
        tracing::trace!(pfns = read_pfns(mem, chain).len(), "virtio-balloon: deflate");
        Some(0)
    })
}

fn host_page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

/// A host range to release with one madvise call.
struct Run {
    start: usize,
    len: usize,
    advice: libc::c_int,
}

/// Releases the guest pages `pfns` (4 KiB each) with madvise: MADV_DONTNEED
/// for private mappings (the next guest access reads zeros), MADV_REMOVE for
/// shared ones (frees the backing pages). PFNs outside guest memory, or whose
/// page straddles a region end, are skipped. Returns the pages released.
pub(crate) fn release_pages(mem: &GuestMemory, pfns: &[u32]) -> usize {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if host_page_size() != BALLOON_PAGE_SIZE as usize {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                host_page = host_page_size(),
                "virtio-balloon: host pages are not 4 KiB; inflated pages are not released"
            );
        }
        return 0;
    }
    let mut sorted = pfns.to_vec();
    sorted.sort_unstable();
    sorted.dedup();

    let mut released = 0;
    let mut run: Option<Run> = None;
    for pfn in sorted {
        let gpa = GuestAddress(u64::from(pfn) * BALLOON_PAGE_SIZE);
        let Some(region) = mem.find_region(gpa) else {
            tracing::debug!(pfn, "virtio-balloon: PFN outside guest memory ignored");
            continue;
        };
        if region.is_hugetlbfs() == Some(true) {
            tracing::debug!(pfn, "virtio-balloon: PFN in a hugetlbfs region ignored");
            continue;
        }
        // One region holds the whole page, or get_slice fails.
        let host = match GuestMemoryBackend::get_slice(mem, gpa, BALLOON_PAGE_SIZE as usize) {
            Ok(slice) => slice.ptr_guard_mut().as_ptr() as usize,
            Err(e) => {
                tracing::debug!(pfn, "virtio-balloon: PFN not fully inside guest memory: {e}");
                continue;
            }
        };
        let advice = if region.flags() & libc::MAP_SHARED != 0 { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
        match &mut run {
            Some(r) if r.start + r.len == host && r.advice == advice => r.len += BALLOON_PAGE_SIZE as usize,
            _ => {
                if let Some(r) = run.take() {
                    released += madvise(mem, &r);
                }
                run = Some(Run { start: host, len: BALLOON_PAGE_SIZE as usize, advice });
            }
        }
    }
    if let Some(r) = run {
        released += madvise(mem, &r);
    }
    released
}

/// Applies one run; returns the pages released (0 on failure).
fn madvise(_mem: &GuestMemory, r: &Run) -> usize {
    // SAFETY: [start, start + len) consists of whole 4 KiB pages, each obtained
    // from a slice of a region of `_mem`, so the range is mapped and stays mapped
    // while `_mem` is borrowed. Discarding page contents changes what the guest
    // reads there but breaks no Rust invariant: guest memory is only ever accessed
    // through volatile slices, never through references.
    let rc = unsafe { libc::madvise(r.start as *mut libc::c_void, r.len, r.advice) };
    if rc != 0 {
        tracing::debug!(
            len = r.len,
            advice = r.advice,
            "virtio-balloon: madvise failed: {}",
            std::io::Error::last_os_error()
        );
        return 0;
    }
    r.len / BALLOON_PAGE_SIZE as usize
}

/// Parses a statistics report (le16 tag, le64 value; packed, 10 bytes each).
fn read_stats(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Vec<(u16, u64)> {
    gather_readable(mem, chain, MAX_STATS * STAT_ENTRY_LEN)
        .chunks_exact(STAT_ENTRY_LEN)
        .map(|c| {
            let tag = u16::from_le_bytes([c[0], c[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&c[2..10]);
            (tag, u64::from_le_bytes(v))
        })
        .collect()
}

/// Handles the statistics queue: records each report in `sink` and keeps the
/// newest buffer in `held` (returning an older held one, if the driver sent two).
/// Returns whether the driver must be interrupted.
pub(crate) fn process_stats(
    mem: &GuestMemory,
    queue: &mut Queue,
    held: &mut Option<u16>,
    sink: &Mutex<Option<BalloonStats>>,
) -> bool {
    let mut to_return = Vec::new();
    let mut notify = drain_queue(mem, queue, |chain| {
        let head = chain.head_index();
        let entries = read_stats(mem, chain);
        tracing::trace!(entries = entries.len(), "virtio-balloon: statistics report");
        let mut guard = sink.lock().unwrap_or_else(|e| e.into_inner());
        let updates = guard.as_ref().map_or(0, |s| s.updates) + 1;
        *guard = Some(BalloonStats { entries, updates });
        if let Some(old) = held.replace(head) {
            to_return.push(old);
        }
        None
    });
    let mut used = false;
    for head in to_return {
        used |= add_used(mem, queue, head, 0);
    }
    if used {
        notify |= needs_notification(mem, queue);
    }
    notify
}

/// Asks the driver for fresh statistics by giving back the held buffer.
/// Returns whether the driver must be interrupted (false if no buffer is held).
pub(crate) fn return_stats_buffer(mem: &GuestMemory, queue: &mut Queue, held: &mut Option<u16>) -> bool {
    match held.take() {
        Some(head) => add_used(mem, queue, head, 0) && needs_notification(mem, queue),
        None => false,
    }
}

/// The stats buffer the device held when its state was captured, if any: after
/// a restore the queue shows one chain taken but not used, the last one taken.
pub(crate) fn recover_held_stats(mem: &GuestMemory, queue: &Queue) -> Option<u16> {
    if queue.next_avail() == queue.next_used() {
        return None;
    }
    let slot = queue.next_avail().wrapping_sub(1).checked_rem(queue.size())?;
    let addr = GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(slot))?;
    mem.read_obj::<u16>(addr).ok().map(u16::from_le)
}
