use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::VirtioInterrupt;

/// Guest memory as devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// A shared-memory region a device exposes (virtio-mmio SHMSel/SHMLen/SHMBase).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmRegion {
    /// Region id (what the driver writes to SHMSel).
    pub id: u8,
    /// Guest-physical base.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Host memory a device wants the machine to map into guest-physical space
/// for one of its shared-memory regions (a virtio-fs DAX window). The device
/// owns the mapping and keeps it valid for as long as it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Shared-memory region id.
    pub id: u8,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
    /// Length in bytes (a multiple of 2 MiB).
    pub len: u64,
}

/// Everything a device needs once the driver set DRIVER_OK.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues, configured and validated by the transport.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, readable when the driver notified that queue
    /// (written by the hypervisor's ioeventfd or by the transport).
    pub queue_events: Vec<EventFd>,
    /// Notifies the driver.
    pub interrupt: Arc<VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The queues come from a snapshot restored into a new VM process: host-side
    /// connections from before the snapshot are gone (vsock resets its transport).
    pub restored: bool,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver's set-up is unusable (e.g. a queue the device needs is not ready).
    #[error("bad driver set-up: {0}")]
    BadSetup(String),
    /// The host side failed (thread, file, socket).
    #[error("device back end failed: {0}")]
    Backend(String),
}

/// Why a device's own snapshot state could not be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// The saved bytes are not a state this device wrote.
    #[error("device state is corrupt: {0}")]
    Corrupt(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The device cannot save or load it (its own error).
    #[error(transparent)]
    Device(Box<dyn std::error::Error + Send + Sync>),
    /// This device keeps no state, or not in this condition.
    #[error("{0}")]
    Unsupported(String),
}

/// A virtio device: identity, features, config space and request handling.
pub trait VirtioDevice: Send {
    /// virtio device type (see [`crate::device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver (must include [`crate::VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// Reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset` (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving (driver reset): drops queues, stops worker threads.
    fn reset(&mut self);
    /// Stops serving and hands back the queues with their current ring positions,
    /// so the transport can snapshot them and later resume. `None` (the default):
    /// this device cannot be snapshotted while active.
    fn pause(&mut self) -> Option<Vec<Queue>> {
        None
    }
    /// The device's own state beyond its queues (tables of a server, say),
    /// taken while paused for a snapshot. `None` (the default): nothing to keep.
    fn save_state(&self) -> Result<Option<Vec<u8>>, DeviceStateError> {
        Ok(None)
    }
    /// Loads what [`save_state`](Self::save_state) returned (in another
    /// process), before the device is activated with the snapshot's queues.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), DeviceStateError> {
        Err(DeviceStateError::Unsupported(format!("virtio device type {} keeps no state", self.device_type())))
    }
    /// Host memory to map into the guest for shared-memory regions (none by
    /// default). The machine places each and calls
    /// [`place_device_memory`](Self::place_device_memory) before the guest runs.
    fn device_memory(&self) -> Vec<DeviceMemory> {
        Vec::new()
    }
    /// Where the machine mapped the region `id` of [`device_memory`](Self::device_memory).
    fn place_device_memory(&mut self, _id: u8, _guest_base: u64) {}
    /// Shared-memory regions (none by default).
    fn shm_regions(&self) -> Vec<ShmRegion> {
        Vec::new()
    }
    /// Host directories this device opens files below while it serves the
    /// guest (none by default: a device works on descriptors opened before).
    /// The threads that run for the guest are confined to these (Landlock).
    fn host_paths(&self) -> Vec<sm_seccomp::FsRule> {
        Vec::new()
    }
}

/// Copies `config[offset..]` into `data`; bytes beyond the config space read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}
