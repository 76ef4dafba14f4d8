use std::sync::Arc;

use crate::{ForceExit, Result, VcpuExit, VcpuState, VmState};

/// Parameters fixed when a VM is created.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Number of vCPUs the VM will have (used for CPU topology and limits).
    pub vcpu_count: u32,
}

/// A hypervisor backend: creates VMs.
pub trait Hypervisor: Send + Sync {
    /// Short backend name, e.g. "kvm".
    fn name(&self) -> &'static str;
    /// Creates a VM with its platform interrupt controllers and timers.
    fn create_vm(&self, config: &VmConfig) -> Result<Arc<dyn Vm>>;
    /// Largest vCPU count the backend supports for one VM.
    fn max_vcpus(&self) -> u32;
    /// Largest vCPU count a Linux guest can boot with here, with the reason when
    /// it is below [`Hypervisor::max_vcpus`] (a host limitation, not a VM limit).
    fn max_linux_vcpus(&self) -> (u32, Option<&'static str>) {
        (self.max_vcpus(), None)
    }
}

/// One guest-physical memory slot backed by host memory.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegion {
    /// Slot number, unique within the VM.
    pub slot: u32,
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes (page multiple).
    pub size: u64,
    /// Host virtual address of the backing memory.
    pub host_addr: u64,
    /// Guest writes fault to the VMM instead of reaching memory.
    pub read_only: bool,
    /// Track dirty pages of this slot.
    pub log_dirty: bool,
}

/// An interrupt line into the VM's interrupt controller.
pub trait IrqLine: Send + Sync {
    /// Signals an edge-triggered interrupt.
    fn trigger(&self) -> Result<()>;
}

/// A virtual machine: memory slots, interrupt lines, vCPUs, device state.
pub trait Vm: Send + Sync {
    /// Maps host memory into the guest.
    ///
    /// # Safety
    /// `[region.host_addr, region.host_addr + region.size)` must be a valid mapping that
    /// outlives the slot (until `unmap_memory` or the VM is dropped).
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()>;
    /// Removes a memory slot.
    fn unmap_memory(&self, slot: u32) -> Result<()>;
    /// Creates vCPU `id`.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Returns an interrupt line for global system interrupt `gsi`.
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>>;
    /// Number of interrupt lines (GSIs) devices may use.
    fn irq_line_count(&self) -> u32;
    /// Makes a guest write of the 32-bit value `datamatch` to MMIO address `addr`
    /// signal `fd` without leaving the guest (an ioeventfd). Backends without such
    /// a fast path return [`crate::Error::Unsupported`]; the write then arrives as
    /// an ordinary MMIO exit. Linux only (an eventfd): elsewhere every notify
    /// is an MMIO exit.
    #[cfg(target_os = "linux")]
    fn register_mmio_notifier(&self, _addr: u64, _datamatch: u32, _fd: &vmm_sys_util::eventfd::EventFd) -> Result<()> {
        Err(crate::Error::Unsupported("MMIO write notifiers"))
    }
    /// Captures VM-wide device state (interrupt controllers, timers, clock).
    fn save_state(&self) -> Result<VmState>;
    /// Restores VM-wide device state captured by `save_state` of the same backend.
    fn restore_state(&self, state: &VmState) -> Result<()>;
    /// Returns and clears the dirty-page bitmap of `slot` (one bit per 4 KiB page).
    fn dirty_log(&self, _slot: u32, _size: u64) -> Result<Vec<u64>> {
        Err(crate::Error::Unsupported("dirty page log"))
    }
}

/// A virtual CPU. Run by one thread at a time (every mutation takes `&mut self`);
/// `Sync` so that a machine holding paused vCPUs can be shared between threads.
pub trait Vcpu: Send + Sync {
    /// vCPU index within its VM.
    fn id(&self) -> u32;
    /// Enters the guest until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    /// Returns a handle that kicks this vCPU out of `run` from any thread.
    fn force_exit(&self) -> ForceExit;
    /// After a [`VcpuExit::Halt`] (x86 HLT, Arm WFI): waits until an
    /// interrupt may be pending for this vCPU, a [`ForceExit`] kick comes, or
    /// `max` has passed, whichever is first; the run loop then runs it again.
    /// Backends whose interrupt controller wakes halted vCPUs inside the
    /// hypervisor (KVM's in-kernel LAPIC) never report `Halt`; the default
    /// sleeps a little, so a backend that does is never spun on.
    fn wait_for_interrupt(&mut self, max: std::time::Duration) -> Result<()> {
        std::thread::sleep(max.min(std::time::Duration::from_millis(1)));
        Ok(())
    }
    /// The x86_64 boot set-up of this vCPU, if it is an x86_64 vCPU.
    fn as_x86_64(&mut self) -> Option<&mut dyn crate::x86_64::X86Vcpu> {
        None
    }
    /// The aarch64 boot set-up of this vCPU, if it is an aarch64 vCPU.
    fn as_aarch64(&mut self) -> Option<&mut dyn crate::aarch64::Aarch64Vcpu> {
        None
    }
    /// Instruction pointer, stack, control registers and privilege level, for
    /// error reports.
    fn register_summary(&self) -> String;
    /// Captures the complete vCPU state. The vCPU must not be running.
    fn save_state(&mut self) -> Result<VcpuState>;
    /// Restores a state captured by `save_state` of the same backend.
    fn restore_state(&mut self, state: &VcpuState) -> Result<()>;
}
