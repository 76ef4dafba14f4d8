use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::regs::*;
use super::state::{QueueSnapshot, TransportState};
use crate::{Activation, GuestMemory, InterruptLine, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};

/// A virtio device behind the virtio-mmio v2 register interface.
///
/// The VMM forwards MMIO reads and writes of the device's window to [`read`] and
/// [`write`]. Queue notifications become writes to per-queue eventfds, which the
/// VMM may instead register as hypervisor ioeventfds on `base + REG_QUEUE_NOTIFY`
/// with the queue index as datamatch (then notifications skip the VMM entirely).
///
/// Anything a driver does wrong — odd access sizes, out-of-range selectors,
/// features never offered, unusable queues — is ignored, refused through the
/// status register, or reported with DEVICE_NEEDS_RESET; never a panic.
///
/// [`read`]: MmioTransport::read
/// [`write`]: MmioTransport::write
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    shm_sel: u32,
    config_generation: u32,
    activated: bool,
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).unwrap_or_else(|_| Queue::new(256).expect("256 is a valid queue size")))
        .collect()
}

impl MmioTransport {
    /// Wraps `device`; it signals the guest through `line`.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemory, line: Arc<dyn InterruptLine>) -> std::io::Result<Self> {
        let queues = new_queues(&*device);
        let queue_events =
            (0..queues.len()).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(VirtioInterrupt::new(line)),
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The per-queue notification eventfds (for ioeventfd registration).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        &*self.device
    }

    /// The interrupt state shared with the device.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device is serving its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    fn queue_config_allowed(&self) -> bool {
        // Queues are set up after FEATURES_OK and before DRIVER_OK, while not ready.
        self.status & STATUS_FEATURES_OK != 0
            && self.status & STATUS_DRIVER_OK == 0
            && self.selected_queue().is_some_and(|q| !q.ready())
    }

    fn shm_region(&self) -> Option<crate::ShmRegion> {
        self.device.shm_regions().into_iter().find(|r| u32::from(r.id) == self.shm_sel)
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            tracing::debug!(offset, len = data.len(), "virtio-mmio: non 32-bit register read");
            data.fill(0);
            return;
        }
        let features = self.device.device_features();
        let value: u32 = match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_SHM_LEN_LOW => self.shm_region().map_or(u32::MAX, |r| r.len as u32),
            REG_SHM_LEN_HIGH => self.shm_region().map_or(u32::MAX, |r| (r.len >> 32) as u32),
            REG_SHM_BASE_LOW => self.shm_region().map_or(u32::MAX, |r| r.base as u32),
            REG_SHM_BASE_HIGH => self.shm_region().map_or(u32::MAX, |r| (r.base >> 32) as u32),
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "virtio-mmio: read of a write-only or unknown register");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handles a guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            if self.status & STATUS_FAILED == 0 {
                self.device.write_config(offset - REG_CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(offset, len = data.len(), "virtio-mmio: non 32-bit register write ignored");
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK) != 0 {
                    tracing::debug!("virtio-mmio: driver features written after FEATURES_OK, ignored");
                    return;
                }
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => self.with_queue(|q| q.set_size(v as u16)),
            REG_QUEUE_READY => {
                if self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
                    if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                        q.set_ready(v == 1);
                    }
                }
            }
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            REG_QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            REG_QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            REG_QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            REG_QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            REG_QUEUE_NOTIFY => match self.queue_events.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: queue notify eventfd: {e}");
                    }
                }
                None => tracing::debug!(queue = v, "virtio-mmio: notify of a queue that does not exist"),
            },
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            REG_SHM_SEL => self.shm_sel = v,
            _ => tracing::debug!(offset, "virtio-mmio: write to a read-only or unknown register ignored"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if !self.queue_config_allowed() {
            tracing::debug!(
                queue = self.queue_sel,
                status = self.status,
                "virtio-mmio: queue set-up out of order, ignored"
            );
            return;
        }
        if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & !self.status & STATUS_FEATURES_OK != 0 {
            let offered = self.device.device_features();
            if self.driver_features & !offered != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                tracing::debug!(
                    driver = self.driver_features,
                    offered,
                    "virtio-mmio: FEATURES_OK refused (unoffered feature or no VERSION_1)"
                );
                // Keep every other bit the driver set; FEATURES_OK stays clear.
                self.status = (self.status | v) & !STATUS_FEATURES_OK;
                return;
            }
        }
        if v & !self.status & STATUS_DRIVER_OK != 0 {
            if self.status & STATUS_FEATURES_OK == 0 {
                tracing::debug!("virtio-mmio: DRIVER_OK before FEATURES_OK, ignored");
                return;
            }
            self.status |= v;
            self.activate();
            return;
        }
        self.status |= v;
    }

    fn activate(&mut self) {
        self.activate_with(false);
    }

    fn activate_with(&mut self, restored: bool) {
        if let Some(bad) = self.queues.iter().position(|q| q.ready() && !q.is_valid(&self.mem)) {
            tracing::warn!(queue = bad, "virtio-mmio: driver set up an invalid queue; device needs reset");
            self.needs_reset();
            return;
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => {
                    tracing::warn!("virtio-mmio: queue state rejected: {e:?}");
                    self.needs_reset();
                    return;
                }
            }
        }
        if self.driver_features & crate::VIRTIO_RING_F_EVENT_IDX != 0 {
            for q in &mut queues {
                q.set_event_idx(true);
            }
        }
        let events = match self.queue_events.iter().map(|e| e.try_clone()).collect::<std::io::Result<Vec<_>>>() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("virtio-mmio: cloning queue eventfds: {e}");
                self.needs_reset();
                return;
            }
        };
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_events: events,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
            restored,
        };
        match self.device.activate(activation) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!(device = self.device.device_type(), "virtio-mmio: activation failed: {e}");
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
    }

    /// Device reset (status 0): the device stops, queues and registers clear.
    pub fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.queues = new_queues(&*self.device);
        for e in &self.queue_events {
            // Drain stale notifications.
            let _ = e.read();
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.interrupt.set_status(0);
    }

    /// Pauses an active device for a snapshot: the device stops and returns its
    /// queues, whose ring positions [`state`](Self::state) then reports.
    pub fn pause(&mut self) -> Result<(), String> {
        if !self.activated {
            return Ok(());
        }
        match self.device.pause() {
            Some(queues) if queues.len() == self.queues.len() => {
                self.queues = queues;
                self.activated = false;
                Ok(())
            }
            Some(_) => {
                Err(format!("virtio device type {} returned the wrong number of queues", self.device.device_type()))
            }
            None => Err(format!("virtio device type {} does not support snapshots", self.device.device_type())),
        }
    }

    /// Resumes a device paused by [`pause`](Self::pause) in this process.
    pub fn resume(&mut self) {
        if !self.activated && self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.activate_with(false);
        }
    }

    /// The device's own state (see [`VirtioDevice::save_state`]); taken while
    /// paused.
    pub fn device_state(&self) -> Result<Option<Vec<u8>>, crate::DeviceStateError> {
        self.device.save_state()
    }

    /// Loads the device's own state; call before [`restore`](Self::restore)
    /// activates it.
    pub fn restore_device_state(&mut self, state: &[u8]) -> Result<(), crate::DeviceStateError> {
        if self.activated {
            return Err(crate::DeviceStateError::Unsupported("cannot load the state of an active device".into()));
        }
        self.device.restore_state(state)
    }

    /// Loads a state captured by [`state`](Self::state) (in another process) and,
    /// if the driver had the device running, starts it with the saved queues.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
        if self.activated {
            return Err("cannot restore an active virtio device".into());
        }
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "saved state has {} queues, device type {} has {}",
                state.queues.len(),
                self.device.device_type(),
                self.queues.len()
            ));
        }
        let mut queues = new_queues(&*self.device);
        for (q, s) in queues.iter_mut().zip(&state.queues) {
            if s.size > q.max_size() {
                return Err(format!("saved queue size {} exceeds the device maximum {}", s.size, q.max_size()));
            }
            q.set_size(s.size);
            q.set_desc_table_address(Some(s.desc_table as u32), Some((s.desc_table >> 32) as u32));
            q.set_avail_ring_address(Some(s.avail_ring as u32), Some((s.avail_ring >> 32) as u32));
            q.set_used_ring_address(Some(s.used_ring as u32), Some((s.used_ring >> 32) as u32));
            q.set_next_avail(s.next_avail);
            q.set_next_used(s.next_used);
            q.set_event_idx(s.event_idx);
            q.set_ready(s.ready);
        }
        self.queues = queues;
        self.status = state.status;
        self.driver_features = state.acked_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.shm_sel = state.shm_sel;
        self.config_generation = state.config_generation;
        self.interrupt.set_status(state.interrupt_status);
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_DEVICE_NEEDS_RESET == 0 {
            self.activate_with(true);
        }
        Ok(())
    }

    /// Captures the transport registers and queue configuration.
    pub fn state(&self) -> TransportState {
        TransportState {
            status: self.status,
            acked_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            shm_sel: self.shm_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
#[path = "transport/tests.rs"]
mod tests;
