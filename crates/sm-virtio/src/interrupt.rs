use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Interrupt status bit: a used ring was updated.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The wire from a device to the guest's interrupt controller (e.g. an irqfd).
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt (edge).
    fn trigger(&self) -> io::Result<()>;
}

/// How a virtio device notifies the driver. Implemented by the transport, which
/// records the reason in its interrupt status register before raising the line.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: Arc<dyn InterruptLine>,
}

impl VirtioInterrupt {
    /// Creates the interrupt state over `line`.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        VirtioInterrupt { status: AtomicU32::new(0), line }
    }

    /// Tells the driver a used ring changed.
    pub fn signal_used_queue(&self) {
        self.signal(INT_VRING);
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!("virtio interrupt could not be raised: {e}");
        }
    }

    /// Current interrupt status register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status register (restore).
    pub fn set_status(&self, value: u32) {
        self.status.store(value, Ordering::SeqCst);
    }
}
