//! virtio-vsock packet header fields and constants (virtio spec 5.10).

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Default guest CID.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// Stream socket type.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset / refused.
pub const OP_RST: u16 = 3;
/// Half or full shutdown.
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// Credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Ask the peer for its credit.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// The header fields of one packet, independent of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// Sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed so far.
    pub fwd_cnt: u32,
}

impl Header {
    /// A header from the host (`local_port`) to the guest (`peer_port`).
    pub fn to_guest(guest_cid: u64, local_port: u32, peer_port: u32, op: u16) -> Self {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            type_: TYPE_STREAM,
            op,
            ..Default::default()
        }
    }
}
