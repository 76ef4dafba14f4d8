//! The virtio-mmio version 2 transport (virtio 1.2 spec, section 4.2).

mod regs;
mod state;
mod transport;

pub use regs::*;
pub use state::{QueueSnapshot, TransportState, TRANSPORT_STATE_VERSION};
pub use transport::MmioTransport;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
