//! virtio for supermachine: the virtio-mmio (version 2) transport and the devices
//! behind it.
//!
//! This crate owns the guest-visible virtio contract: register map, feature
//! negotiation, queue set-up, interrupt status, device reset, shared-memory region
//! registers, and the devices' request handling. Devices see guest memory only
//! through vm-memory and signal the guest only through [`InterruptLine`]; nothing
//! here knows which hypervisor runs the guest, so any VMM can reuse it.
//!
//! Register offsets, status bits, device ids, feature bits, request types and
//! header layouts come from virtio-bindings; what it lacks (0.2.7 has no vsock
//! or balloon module, no mmio magic/version values) is typed in the module
//! that uses it, citing the spec section.

pub mod balloon;
pub mod block;
mod device;
mod interrupt;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;
pub mod worker;

pub use device::{
    read_config_bytes, ActivateError, Activation, DeviceMemory, DeviceStateError, GuestMemory, ShmRegion, VirtioDevice,
};
pub use interrupt::{InterruptLine, VirtioInterrupt, INT_CONFIG, INT_VRING};

/// virtio 1.x feature: the device complies with version 1 (mandatory for mmio v2).
/// (virtio-bindings gives feature bit numbers; these are the masks.)
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Feature: the driver and device use used/avail event indices to suppress
/// notifications (VIRTIO_F_RING_EVENT_IDX).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device type ids (virtio spec 5.x), from virtio-bindings.
pub mod device_type {
    use virtio_bindings::virtio_ids as ids;

    /// Network device.
    pub const NET: u32 = ids::VIRTIO_ID_NET;
    /// Block device.
    pub const BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
    /// Entropy source.
    pub const RNG: u32 = ids::VIRTIO_ID_RNG;
    /// Memory balloon.
    pub const BALLOON: u32 = ids::VIRTIO_ID_BALLOON;
    /// Socket device.
    pub const VSOCK: u32 = ids::VIRTIO_ID_VSOCK;
    /// File system device.
    pub const FS: u32 = ids::VIRTIO_ID_FS;
}
