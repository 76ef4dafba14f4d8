//! virtio-blk requests: parsing a descriptor chain (any layout: device-readable
//! header and data, then device-writable data and the status byte) and executing
//! it against the [`Disk`]. Every field the guest controls is checked; a bad
//! request completes with an error status, a chain that cannot even carry a status
//! byte is completed with nothing written. Nothing here panics.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::Disk;
use super::{ID_BYTES, SECTOR_SIZE};
use crate::worker::drain_queue;
use crate::GuestMemory;

/// Request types (virtio 1.2, 5.2.6).
pub(crate) use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

/// Status values (a one-byte field; virtio-bindings types them u32).
pub const VIRTIO_BLK_S_OK: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK as u8;
/// The request failed (bad request or host I/O error).
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// Unknown request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

/// `struct virtio_blk_outhdr`: le32 type, le32 ioprio, le64 sector.
const HEADER_LEN: u64 = std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_outhdr>() as u64;
/// Largest data transfer accepted in one request (Linux sends at most a few MiB).
pub const MAX_REQUEST_BYTES: u64 = 256 << 20;
/// Longest chain accepted (header + seg_max data + status fits easily).
pub(crate) const MAX_DESCRIPTORS: usize = 1024;

/// A guest memory range one descriptor covers.
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: GuestAddress,
    len: u64,
}

fn total(segs: &[Seg]) -> u64 {
    segs.iter().map(|s| s.len).sum()
}

/// The part of `segs` from byte `skip` on.
fn skip(segs: &[Seg], mut skip: u64) -> Vec<Seg> {
    let mut out = Vec::with_capacity(segs.len());
    for s in segs {
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        // `skip < s.len <= u32::MAX`, and the range was checked to be in guest
        // memory, so the addition cannot overflow.
        out.push(Seg { addr: s.addr.unchecked_add(skip), len: s.len - skip });
        skip = 0;
    }
    out
}

/// Chains that cannot be answered with a status byte; they are put on the used
/// ring with length 0 so the driver gets its descriptors back.
#[derive(Debug, thiserror::Error)]
enum Dropped {
    #[error("empty chain (head index out of range)")]
    Empty,
    #[error("chain ends in a descriptor with NEXT set (loop, next index out of range, or unreadable descriptor)")]
    Truncated,
    #[error("chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    #[error("last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("status byte outside guest memory")]
    StatusOutsideMemory,
}

/// Requests that complete with VIRTIO_BLK_S_IOERR.
#[derive(Debug, thiserror::Error)]
enum ReqError {
    #[error("descriptor {addr:#x}+{len:#x} outside guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("header shorter than 16 bytes or not device-readable")]
    ShortHeader,
    #[error("header unreadable: {0}")]
    Header(vm_memory::GuestMemoryError),
    #[error("data buffer has the wrong direction for the request type")]
    WrongDirection,
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("data length {0} exceeds the {MAX_REQUEST_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("sectors {sector}+{count} beyond capacity {capacity}")]
    OutOfRange { sector: u64, count: u64, capacity: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("id buffer of {0} bytes is shorter than 20")]
    ShortIdBuffer(u64),
    #[error("writing to guest memory: {0}")]
    GuestWrite(vm_memory::GuestMemoryError),
    #[error("host I/O on {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// A parsed chain: readable ranges, writable data ranges (status byte excluded),
/// the status byte, and the first per-descriptor defect if any.
struct Parsed {
    readable: Vec<Seg>,
    writable: Vec<Seg>,
    status: GuestAddress,
    defect: Option<ReqError>,
}

fn parse(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Result<Parsed, Dropped> {
    let mut descs: Vec<Descriptor> = Vec::new();
    for d in chain {
        if descs.len() == MAX_DESCRIPTORS {
            return Err(Dropped::TooLong);
        }
        descs.push(d);
    }
    let last = *descs.last().ok_or(Dropped::Empty)?;
    // The iterator stops silently on loops (TTL), out-of-range next indices and
    // unreadable descriptors: the last descriptor it yields still says NEXT.
    if last.has_next() {
        return Err(Dropped::Truncated);
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(Dropped::NoStatus);
    }
    let status = last.addr().checked_add(u64::from(last.len()) - 1).ok_or(Dropped::StatusOutsideMemory)?;
    if !GuestMemoryBackend::check_range(mem, status, 1) {
        return Err(Dropped::StatusOutsideMemory);
    }

    let mut parsed = Parsed { readable: Vec::new(), writable: Vec::new(), status, defect: None };
    let mut seen_writable = false;
    let n = descs.len();
    for (i, d) in descs.iter().enumerate() {
        let mut len = u64::from(d.len());
        if i == n - 1 {
            len -= 1; // the status byte
        }
        if d.is_write_only() {
            seen_writable = true;
        } else if seen_writable && parsed.defect.is_none() {
            parsed.defect = Some(ReqError::ReadableAfterWritable);
        }
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), len as usize) {
            if parsed.defect.is_none() {
                parsed.defect = Some(ReqError::OutsideMemory { addr: d.addr().0, len });
            }
            continue;
        }
        let seg = Seg { addr: d.addr(), len };
        if d.is_write_only() {
            parsed.writable.push(seg);
        } else {
            parsed.readable.push(seg);
        }
    }
    Ok(parsed)
}

/// Reads `buf.len()` bytes from the start of `segs`.
fn gather(mem: &GuestMemory, segs: &[Seg], buf: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        mem.read_slice(&mut buf[done..done + n], s.addr)?;
        done += n;
    }
    Ok(())
}

/// Writes `data` to the start of `segs` (which must hold it).
fn scatter(mem: &GuestMemory, segs: &[Seg], data: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(s.len as usize);
        mem.write_slice(&data[done..done + n], s.addr)?;
        done += n;
    }
    Ok(())
}

/// Checks a transfer of `len` bytes at `sector`; returns the byte offset.
fn check_transfer(disk: &Disk, sector: u64, len: u64) -> Result<u64, ReqError> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(ReqError::Unaligned(len));
    }
    if len > MAX_REQUEST_BYTES {
        return Err(ReqError::TooLarge(len));
    }
    let count = len / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= disk.capacity() => Ok(sector * SECTOR_SIZE),
        _ => Err(ReqError::OutOfRange { sector, count, capacity: disk.capacity() }),
    }
}

fn io_err(disk: &Disk, source: std::io::Error) -> ReqError {
    tracing::warn!(path = %disk.path().display(), "virtio-blk: host I/O failed: {source}");
    ReqError::Io { path: disk.path().display().to_string(), source }
}

/// Runs a parsed request; returns the status and the data bytes written to the
/// guest (status byte excluded).
fn execute(disk: &Disk, mem: &GuestMemory, p: Parsed) -> Result<(u8, u32), ReqError> {
    if let Some(defect) = p.defect {
        return Err(defect);
    }
    let readable = total(&p.readable);
    if readable < HEADER_LEN {
        return Err(ReqError::ShortHeader);
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    gather(mem, &p.readable, &mut hdr).map_err(ReqError::Header)?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
    let writable = total(&p.writable);

    match req_type {
        VIRTIO_BLK_T_IN => {
            if readable != HEADER_LEN {
                return Err(ReqError::WrongDirection);
            }
            let mut offset = check_transfer(disk, sector, writable)?;
            for s in &p.writable {
                disk.read_to_guest(mem, s.addr, s.len as usize, offset).map_err(|e| io_err(disk, e))?;
                offset += s.len;
            }
            // `writable <= MAX_REQUEST_BYTES` fits in u32.
            Ok((VIRTIO_BLK_S_OK, writable as u32))
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only() {
                return Err(ReqError::ReadOnly);
            }
            if writable != 0 {
                return Err(ReqError::WrongDirection);
            }
            let data = skip(&p.readable, HEADER_LEN);
            let mut offset = check_transfer(disk, sector, total(&data))?;
            for s in &data {
                disk.write_from_guest(mem, s.addr, s.len as usize, offset).map_err(|e| io_err(disk, e))?;
                offset += s.len;
            }
            Ok((VIRTIO_BLK_S_OK, 0))
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only() {
                disk.flush().map_err(|e| io_err(disk, e))?;
            }
            Ok((VIRTIO_BLK_S_OK, 0))
        }
        VIRTIO_BLK_T_GET_ID => {
            if writable < ID_BYTES as u64 {
                return Err(ReqError::ShortIdBuffer(writable));
            }
            scatter(mem, &p.writable, disk.id()).map_err(ReqError::GuestWrite)?;
            Ok((VIRTIO_BLK_S_OK, ID_BYTES as u32))
        }
        other => {
            tracing::debug!(req_type = other, "virtio-blk: unsupported request type");
            Ok((VIRTIO_BLK_S_UNSUPP, 0))
        }
    }
}

/// Handles one chain; returns the used length (bytes written to the guest).
fn handle_chain(disk: &Disk, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
    let head = chain.head_index();
    let parsed = match parse(mem, chain) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(head, "virtio-blk: dropping request: {e}");
            return 0;
        }
    };
    let status_addr = parsed.status;
    let (status, written) = execute(disk, mem, parsed).unwrap_or_else(|e| {
        tracing::debug!(head, "virtio-blk: request failed: {e}");
        (VIRTIO_BLK_S_IOERR, 0)
    });
    match mem.write_obj(status, status_addr) {
        Ok(()) => written + 1,
        Err(e) => {
            tracing::debug!(head, "virtio-blk: writing the status byte: {e}");
            0
        }
    }
}

/// Serves every request available on `queue`; returns whether the driver must be
/// interrupted.
pub(crate) fn process_queue(disk: &Disk, mem: &GuestMemory, queue: &mut Queue) -> bool {
    drain_queue(mem, queue, |chain| Some(handle_chain(disk, mem, chain)))
}
