//! Frames in and out of descriptor chains: the transmit side gathers a chain's
//! readable descriptors and strips the virtio-net header; the receive side
//! writes a zeroed header and the frame into a chain's writable descriptors.
//! Both are bounded and never trust a length the driver wrote.

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend};

use crate::GuestMemory;

/// Bytes of `virtio_net_hdr_v1` before every frame (VIRTIO_F_VERSION_1).
pub const NET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_v1>();
/// Longest frame the device carries: an Ethernet header, a VLAN tag and the
/// largest MTU the config space can name.
pub const MAX_FRAME: usize = 14 + 4 + 65535 - 14;
/// Shortest frame: an Ethernet header.
pub const MIN_FRAME: usize = 14;
/// Byte offset of `num_buffers` in the header.
const NUM_BUFFERS_AT: usize = std::mem::offset_of!(virtio_bindings::virtio_net::virtio_net_hdr_v1, num_buffers);

/// Why a chain did not carry a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The chain has a device-writable descriptor where only readable ones belong.
    #[error("a transmit chain has a device-writable descriptor")]
    WritableInTx,
    /// The chain holds more than a header and [`MAX_FRAME`] bytes.
    #[error("a transmit chain is longer than a header and {MAX_FRAME} bytes")]
    TooLong,
    /// Not even a header and an Ethernet header.
    #[error("a chain of {0} bytes holds no frame")]
    TooShort(usize),
    /// A descriptor points outside guest memory.
    #[error("a descriptor is outside guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The receive chain's writable space cannot hold the header and the frame.
    #[error("a receive chain of {room} writable bytes cannot hold a frame of {frame}")]
    NoRoom {
        /// Writable bytes of the chain.
        room: u64,
        /// Frame length.
        frame: usize,
    },
}

/// Gathers a transmit chain's bytes into `buf` (never more than a header and
/// [`MAX_FRAME`]) and returns the frame behind the header.
pub(crate) fn read_tx_frame<'b>(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    buf: &'b mut Vec<u8>,
) -> Result<&'b [u8], FrameError> {
    let limit = NET_HDR_LEN + MAX_FRAME;
    buf.clear();
    for desc in chain {
        if desc.is_write_only() {
            return Err(FrameError::WritableInTx);
        }
        let len = desc.len() as usize;
        if buf.len() + len > limit {
            return Err(FrameError::TooLong);
        }
        let at = buf.len();
        buf.resize(at + len, 0);
        mem.read_slice(&mut buf[at..], desc.addr())?;
    }
    if buf.len() < NET_HDR_LEN + MIN_FRAME {
        return Err(FrameError::TooShort(buf.len()));
    }
    Ok(&buf[NET_HDR_LEN..])
}

/// Writes a header (`num_buffers` 1, nothing else set) and `frame` into the
/// chain's writable descriptors; returns the bytes written. Readable
/// descriptors are skipped. Nothing is written unless all of it fits.
pub(crate) fn write_rx_frame(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    frame: &[u8],
) -> Result<u32, FrameError> {
    let mut header = [0u8; NET_HDR_LEN];
    header[NUM_BUFFERS_AT..NUM_BUFFERS_AT + 2].copy_from_slice(&1u16.to_le_bytes());
    let total = NET_HDR_LEN + frame.len();
    let descs: Vec<_> = chain.writable().collect();
    let room: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if room < total as u64 {
        return Err(FrameError::NoRoom { room, frame: frame.len() });
    }
    // Check every target before writing any, so a bad descriptor leaves no half frame.
    let mut left = total;
    for d in &descs {
        let n = left.min(d.len() as usize);
        if n == 0 {
            break;
        }
        if !GuestMemoryBackend::check_range(mem, d.addr(), n) {
            return Err(FrameError::Memory(vm_memory::GuestMemoryError::InvalidGuestAddress(d.addr())));
        }
        left -= n;
    }
    let mut src = header.iter().chain(frame.iter()).copied();
    let mut scratch = Vec::new();
    let mut left = total;
    for d in &descs {
        let n = left.min(d.len() as usize);
        if n == 0 {
            break;
        }
        scratch.clear();
        scratch.extend(src.by_ref().take(n));
        mem.write_slice(&scratch, d.addr())?;
        left -= n;
    }
    // `total <= NET_HDR_LEN + MAX_FRAME`, far below u32::MAX.
    Ok(total as u32)
}
