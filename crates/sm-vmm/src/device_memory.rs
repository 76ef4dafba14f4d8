//! Device memory: host memory a virtio device asks to have in the guest's
//! physical address space (a virtio-fs DAX window), mapped as hypervisor
//! memory slots above RAM.

use crate::layout::{device_memory_base, DEVICE_MEMORY_ALIGN, DEVICE_MEMORY_END, FIRST_DEVICE_MEMORY_SLOT};
use crate::machine::Machine;
use crate::{Error, Result};

impl Machine {
    /// Maps the host memory of `device`'s shared-memory regions into the guest,
    /// each at the next free [`DEVICE_MEMORY_ALIGN`] boundary from
    /// [`device_memory_base`] (so the same devices added in the same order land
    /// at the same addresses again on restore), in slots from
    /// [`FIRST_DEVICE_MEMORY_SLOT`].
    pub(crate) fn map_device_memory(&mut self, device: &mut dyn sm_virtio::VirtioDevice) -> Result<()> {
        for region in device.device_memory() {
            let base = self.next_device_memory.unwrap_or_else(|| device_memory_base(self.mem_size()));
            let end = base
                .checked_add(region.len)
                .filter(|end| *end <= DEVICE_MEMORY_END && region.len % (2 << 20) == 0 && region.len > 0)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "device memory of {} bytes at {base:#x} does not fit below {DEVICE_MEMORY_END:#x} \
                         (or is not a multiple of 2 MiB)",
                        region.len
                    ))
                })?;
            let slot = FIRST_DEVICE_MEMORY_SLOT + self.device_memory_slots;
            let r = sm_hypervisor::MemoryRegion {
                slot,
                guest_addr: base,
                size: region.len,
                host_addr: region.host_addr,
                read_only: false,
                log_dirty: false,
            };
            // SAFETY: the device owns this mapping and keeps it for its lifetime;
            // the device lives in this machine's transports until the machine is
            // dropped, and no vCPU runs after that.
            unsafe { self.vm.map_memory(r)? };
            device.place_device_memory(region.id, base);
            self.device_memory_slots += 1;
            self.next_device_memory = Some(end.next_multiple_of(DEVICE_MEMORY_ALIGN));
        }
        Ok(())
    }

    fn mem_size(&self) -> u64 {
        self.config.memory_mib << 20
    }
}
