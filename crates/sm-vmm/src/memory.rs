//! Guest RAM: anonymous mappings from vm-memory, registered as hypervisor slots.

use sm_hypervisor::{MemoryRegion, Vm};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;
use crate::{Error, Result};

/// Guest memory type used across the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Smallest guest RAM accepted (the fixed low-memory areas plus a kernel).
pub const MIN_MEMORY: u64 = 16 << 20;

/// Allocates `mem_size` bytes of guest RAM laid out by [`layout::ram_ranges`].
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemory> {
    if mem_size < MIN_MEMORY || !mem_size.is_multiple_of(4096) {
        return Err(Error::Config(format!(
            "guest memory of {mem_size} bytes is invalid: need a multiple of 4 KiB, at least {} MiB",
            MIN_MEMORY >> 20
        )));
    }
    let ranges: Vec<(GuestAddress, usize)> =
        layout::ram_ranges(mem_size).into_iter().map(|(a, s)| (GuestAddress(a), s as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::Memory(format!("allocating {mem_size} bytes: {e}")))
}

/// Registers every region of `mem` as a slot of `vm` (slot numbers from 0).
pub fn map_guest_memory(vm: &dyn Vm, mem: &GuestMemory, log_dirty: bool) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory(format!("host address of region {slot}: {e}")))? as u64;
        let r = MemoryRegion {
            slot: slot as u32,
            guest_addr: region.start_addr().0,
            size: region.len(),
            host_addr,
            read_only: false,
            log_dirty,
        };
        // SAFETY: the region's mapping is owned by `mem`, which the Machine keeps alive
        // for as long as the VM exists (it is dropped after the VM).
        unsafe { vm.map_memory(r)? };
    }
    Ok(())
}

/// Registers every slot of `mem` again after its contents were replaced behind
/// the hypervisor's back (a reset in place drops private pages and re-applies
/// diffs). Deleting a slot makes the hypervisor forget every translation it
/// built from the old contents: on hosts without two-dimensional paging (KVM's
/// shadow MMU, as on kvm_pvm) those include shadow copies of guest page tables,
/// which the host's page-level invalidation (MADV_DONTNEED) does not reach, so
/// without this the guest would keep running on its old page tables.
pub fn reregister_guest_memory(vm: &dyn Vm, mem: &GuestMemory) -> Result<()> {
    for slot in 0..mem.num_regions() {
        vm.unmap_memory(slot as u32)?;
    }
    map_guest_memory(vm, mem, false)
}

/// Total bytes of guest RAM.
pub fn memory_size(mem: &GuestMemory) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}
