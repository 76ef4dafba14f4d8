//! The framework calls: the VM (one per process, as Hypervisor.framework
//! allows), its memory slots (`hv_vm_map`), the in-kernel GICv3 of macOS 15
//! with its SPI lines, and the GIC's saved state. Built on macOS aarch64;
//! elsewhere only type-checked (`cargo xtask check-hvf`).
//!
//! vCPUs are in [`vcpu`] (made, run and dropped on one thread of their own,
//! as sm-vmm does). One vCPU per guest so far (PSCI CPU_ON is denied).

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use applevisor_sys as hv;
use sm_hypervisor::{Error, Hypervisor, IrqLine, MemoryRegion, Result, Vcpu, Vm, VmConfig, VmState};

use crate::hv_error::check;

mod vcpu;
use crate::state::VmDeviceState;
pub use vcpu::HvfVcpu;

/// Guest memory granule of Apple silicon hosts: slots must be 16 KiB aligned.
pub const PAGE_SIZE: u64 = 16 << 10;
/// Where the VMM's aarch64 layout puts the GIC (sm-vmm `arch::aarch64::layout`).
const GIC_DIST_BASE: u64 = 0x0800_0000;
const GIC_REDIST_BASE: u64 = 0x080a_0000;
/// First SPI INTID; the seam's line `n` is INTID `SPI_BASE + n`.
const SPI_BASE: u32 = 32;
/// SPI lines offered to devices.
const SPI_LINES: u32 = 64;

/// The framework allows one VM per process.
static VM_EXISTS: AtomicBool = AtomicBool::new(false);

/// Hypervisor.framework.
pub struct HvfHypervisor {
    max_vcpus: u32,
}

impl HvfHypervisor {
    /// Checks that this process may use the framework (entitlement, macOS 15).
    pub fn new() -> Result<HvfHypervisor> {
        let mut max = 0u32;
        // SAFETY: writes one u32 through the valid pointer.
        check("hv_vm_get_max_vcpu_count", unsafe { hv::hv_vm_get_max_vcpu_count(&mut max) })?;
        Ok(HvfHypervisor { max_vcpus: max })
    }
}

impl Hypervisor for HvfHypervisor {
    fn name(&self) -> &'static str {
        "hvf"
    }

    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>> {
        if config.vcpu_count == 0 || config.vcpu_count > self.max_vcpus {
            return Err(Error::InvalidArgument(format!("{} vCPUs (1..={})", config.vcpu_count, self.max_vcpus)));
        }
        if VM_EXISTS.swap(true, Ordering::SeqCst) {
            return Err(Error::Unsupported("a second VM in one process (Hypervisor.framework allows one)"));
        }
        match create_vm_and_gic() {
            Ok(()) => Ok(Arc::new(HvfVm { slots: Mutex::new(HashMap::new()) })),
            Err(e) => {
                VM_EXISTS.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }
}

fn create_vm_and_gic() -> Result<()> {
    // SAFETY: a null configuration asks for the defaults.
    check("hv_vm_create", unsafe { hv::hv_vm_create(std::ptr::null_mut()) })?;
    // SAFETY: the config object is created, used and released here.
    let made = unsafe {
        let gic = hv::hv_gic_config_create();
        let set =
            check("hv_gic_config_set_distributor_base", hv::hv_gic_config_set_distributor_base(gic, GIC_DIST_BASE))
                .and_then(|()| {
                    check(
                        "hv_gic_config_set_redistributor_base",
                        hv::hv_gic_config_set_redistributor_base(gic, GIC_REDIST_BASE),
                    )
                })
                .and_then(|()| check("hv_gic_create", hv::hv_gic_create(gic)));
        hv::os_release(gic);
        set
    };
    if made.is_err() {
        // SAFETY: the VM this process created above.
        unsafe { hv::hv_vm_destroy() };
    }
    made
}

/// The process's VM.
pub struct HvfVm {
    /// Mapped slots: guest address and size, for unmapping.
    slots: Mutex<HashMap<u32, (u64, u64)>>,
}

impl Vm for HvfVm {
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()> {
        for (what, v) in
            [("guest address", region.guest_addr), ("size", region.size), ("host address", region.host_addr)]
        {
            if v % PAGE_SIZE != 0 {
                return Err(Error::InvalidArgument(format!(
                    "memory slot {}: {what} {v:#x} is not 16 KiB aligned",
                    region.slot
                )));
            }
        }
        let flags = if region.read_only {
            hv::HV_MEMORY_READ | hv::HV_MEMORY_EXEC
        } else {
            hv::HV_MEMORY_READ | hv::HV_MEMORY_WRITE | hv::HV_MEMORY_EXEC
        };
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.contains_key(&region.slot) {
            return Err(Error::InvalidArgument(format!("memory slot {} is mapped already", region.slot)));
        }
        // SAFETY: the caller guarantees the host range is a live mapping that
        // outlives the slot; the framework maps it into the guest.
        check("hv_vm_map", unsafe {
            hv::hv_vm_map(region.host_addr as *const c_void, region.guest_addr, region.size as usize, flags)
        })?;
        slots.insert(region.slot, (region.guest_addr, region.size));
        Ok(())
    }

    fn unmap_memory(&self, slot: u32) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let (addr, size) =
            slots.remove(&slot).ok_or_else(|| Error::InvalidArgument(format!("no memory slot {slot}")))?;
        // SAFETY: a range this VM mapped.
        check("hv_vm_unmap", unsafe { hv::hv_vm_unmap(addr, size as usize) })
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        // The machine calls this on the thread that will run the vCPU.
        Ok(Box::new(vcpu::HvfVcpu::new(id)?))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        if gsi >= SPI_LINES {
            return Err(Error::InvalidArgument(format!("interrupt line {gsi} (0..{SPI_LINES})")));
        }
        Ok(Arc::new(SpiLine { intid: SPI_BASE + gsi }))
    }

    fn irq_line_count(&self) -> u32 {
        SPI_LINES
    }

    fn save_state(&self) -> Result<VmState> {
        // SAFETY: the state object is created, read and released here; the
        // buffer has the size the framework asked for.
        let gic = unsafe {
            let state = hv::hv_gic_state_create();
            let mut size = 0usize;
            let got = check("hv_gic_state_get_size", hv::hv_gic_state_get_size(state, &mut size)).and_then(|()| {
                if size > crate::state::MAX_GIC_STATE {
                    return Err(Error::InvalidState(format!("GIC state of {size} bytes")));
                }
                let mut data = vec![0u8; size];
                check("hv_gic_state_get_data", hv::hv_gic_state_get_data(state, data.as_mut_ptr().cast()))?;
                Ok(data)
            });
            hv::os_release(state);
            got?
        };
        // The virtual timer offset is a vCPU call (its thread's): saved with
        // the vCPUs once they exist.
        VmDeviceState { gic, vtimer_offset: 0 }.encode()
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        let state = VmDeviceState::decode(state)?;
        // SAFETY: the pointer and length describe the decoded buffer.
        check("hv_gic_set_state", unsafe { hv::hv_gic_set_state(state.gic.as_ptr().cast(), state.gic.len()) })
    }
}

impl Drop for HvfVm {
    fn drop(&mut self) {
        // SAFETY: this process's VM; nothing uses it after this.
        let _ = check("hv_vm_destroy", unsafe { hv::hv_vm_destroy() });
        VM_EXISTS.store(false, Ordering::SeqCst);
    }
}

/// An SPI of the in-kernel GIC.
struct SpiLine {
    intid: u32,
}

impl IrqLine for SpiLine {
    fn trigger(&self) -> Result<()> {
        // An edge: raised, then lowered.
        // SAFETY: plain calls on the process's GIC.
        unsafe {
            check("hv_gic_set_spi", hv::hv_gic_set_spi(self.intid, true))?;
            check("hv_gic_set_spi", hv::hv_gic_set_spi(self.intid, false))
        }
    }
}
