//! virtio for supermachine: the virtio-mmio (version 2) transport and the devices
//! behind it.
//!
//! This crate owns the guest-visible virtio contract: register map, feature
//! negotiation, queue set-up, interrupt status, device reset, shared-memory region
//! registers, and the devices' request handling. Devices see guest memory only
//! through vm-memory and signal the guest only through [`InterruptLine`]; nothing
//! here knows which hypervisor runs the guest, so any VMM can reuse it.

pub mod balloon;
pub mod block;
mod device;
mod interrupt;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;
mod worker;

pub use device::{read_config_bytes, ActivateError, Activation, GuestMemory, ShmRegion, VirtioDevice};
pub use interrupt::{InterruptLine, VirtioInterrupt, INT_CONFIG, INT_VRING};

/// virtio 1.x feature bit: the device complies with version 1 (mandatory for mmio v2).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Feature bit: the driver and device use used/avail event indices to suppress
/// notifications (VIRTIO_F_RING_EVENT_IDX).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Device type ids (virtio spec 5.x).
pub mod device_type {
    /// Network device.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Memory balloon.
    pub const BALLOON: u32 = 5;
    /// Socket device.
    pub const VSOCK: u32 = 19;
    /// File system device.
    pub const FS: u32 = 26;
}
