//! A KVM VM behind the `sm_hypervisor::Vm` trait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, KvmRunWrapper, VmFd};
use sm_hypervisor::{Error, IrqLine, MemoryRegion, Result, Vcpu, Vm, VmConfig, VmState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::codec::{pod_read, Decoded, Encoder, Kind};
use crate::cpuid::patch_cpuid;
use crate::kick::{install_kick_signal_handler, set_kick_signal_blocked, VcpuKick};
use crate::vcpu::KvmVcpu;

/// Guest-physical address of the TSS KVM needs on Intel hosts (3 pages below 4 GiB,
/// inside the MMIO gap, never RAM).
pub const TSS_ADDRESS: usize = 0xfffb_d000;
/// GSIs served by the in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;

const SEC_PIT: u16 = 1;
const SEC_PIC_MASTER: u16 = 2;
const SEC_PIC_SLAVE: u16 = 3;
const SEC_IOAPIC: u16 = 4;
const SEC_CLOCK: u16 = 5;

/// A KVM VM with in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT.
pub struct KvmVm {
    fd: VmFd,
    vcpu_count: u32,
    supported_cpuid: CpuId,
    msr_indices: Arc<Vec<u32>>,
    /// kvm_pvm: guest kernel mode is emulated (CPUID hides what it cannot emulate).
    emulated_kernel: bool,
    irq_lines: Mutex<HashMap<u32, Arc<KvmIrqLine>>>,
}

impl KvmVm {
    pub(crate) fn new(kvm: &Kvm, config: &VmConfig) -> Result<Self> {
        install_kick_signal_handler();
        // Threads that are not vCPU threads keep the kick signal blocked; threads this
        // one spawns inherit the mask.
        set_kick_signal_blocked(true);
        let fd = kvm.create_vm().map_err(|e| Error::backend("KVM_CREATE_VM", e))?;
        fd.set_tss_address(TSS_ADDRESS).map_err(|e| Error::backend("KVM_SET_TSS_ADDR", e))?;
        fd.create_irq_chip().map_err(|e| Error::backend("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(|e| Error::backend("KVM_CREATE_PIT2", e))?;
        let supported_cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| Error::backend("KVM_GET_SUPPORTED_CPUID", e))?;
        let msr_indices = Arc::new(crate::msr::saveable_msr_indices(kvm)?);
        Ok(KvmVm {
            fd,
            vcpu_count: config.vcpu_count,
            supported_cpuid,
            msr_indices,
            emulated_kernel: crate::cpuid::host_is_kvm_pvm(),
            irq_lines: Mutex::new(HashMap::new()),
        })
    }

    fn get_irqchip(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip { chip_id, ..Default::default() };
        self.fd.get_irqchip(&mut chip).map_err(|e| Error::backend("KVM_GET_IRQCHIP", e))?;
        Ok(chip)
    }
}

impl Vm for KvmVm {
    unsafe fn map_memory(&self, region: MemoryRegion) -> Result<()> {
        let mut flags = 0;
        if region.read_only {
            flags |= KVM_MEM_READONLY;
        }
        if region.log_dirty {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let r = kvm_userspace_memory_region {
            slot: region.slot,
            flags,
            guest_phys_addr: region.guest_addr,
            memory_size: region.size,
            userspace_addr: region.host_addr,
        };
        // SAFETY: the caller guarantees the host range is valid for the slot's life.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(|e| Error::backend("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn unmap_memory(&self, slot: u32) -> Result<()> {
        let r = kvm_userspace_memory_region { slot, memory_size: 0, ..Default::default() };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.fd.set_user_memory_region(r) }.map_err(|e| Error::backend("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        if id >= self.vcpu_count {
            return Err(Error::InvalidArgument(format!("vCPU id {id} out of range (VM has {})", self.vcpu_count)));
        }
        let fd = self.fd.create_vcpu(u64::from(id)).map_err(|e| Error::backend("KVM_CREATE_VCPU", e))?;
        let mut cpuid = self.supported_cpuid.clone();
        patch_cpuid(&mut cpuid, id, self.vcpu_count, self.emulated_kernel);
        fd.set_cpuid2(&cpuid).map_err(|e| Error::backend("KVM_SET_CPUID2", e))?;
        let run =
            KvmRunWrapper::mmap_from_fd(&fd, self.fd.run_size()).map_err(|e| Error::backend("mmap kvm_run", e))?;
        let kick = Arc::new(VcpuKick::new(run));
        Ok(Box::new(KvmVcpu::new(id, fd, kick, self.msr_indices.clone())?))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        if gsi >= IOAPIC_PINS {
            return Err(Error::InvalidArgument(format!("GSI {gsi} out of range (IOAPIC has {IOAPIC_PINS} pins)")));
        }
        let mut lines = self.irq_lines.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(line) = lines.get(&gsi) {
            return Ok(line.clone());
        }
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::backend("eventfd", e))?;
        self.fd.register_irqfd(&evt, gsi).map_err(|e| Error::backend("KVM_IRQFD", e))?;
        let line = Arc::new(KvmIrqLine { evt });
        lines.insert(gsi, line.clone());
        Ok(line)
    }

    fn irq_line_count(&self) -> u32 {
        IOAPIC_PINS
    }

    fn register_mmio_notifier(&self, addr: u64, datamatch: u32, fd: &EventFd) -> Result<()> {
        self.fd
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| Error::backend("KVM_IOEVENTFD", e))
    }

    fn save_state(&self) -> Result<VmState> {
        let mut enc = Encoder::new(Kind::Vm);
        enc.pod(SEC_PIT, &self.fd.get_pit2().map_err(|e| Error::backend("KVM_GET_PIT2", e))?);
        enc.pod(SEC_PIC_MASTER, &self.get_irqchip(KVM_IRQCHIP_PIC_MASTER)?);
        enc.pod(SEC_PIC_SLAVE, &self.get_irqchip(KVM_IRQCHIP_PIC_SLAVE)?);
        enc.pod(SEC_IOAPIC, &self.get_irqchip(KVM_IRQCHIP_IOAPIC)?);
        enc.pod(SEC_CLOCK, &self.fd.get_clock().map_err(|e| Error::backend("KVM_GET_CLOCK", e))?);
        Ok(VmState(enc.finish()))
    }

    fn restore_state(&self, state: &VmState) -> Result<()> {
        let dec = Decoded::parse(&state.0, Kind::Vm)?;
        let pit = pod_read(dec.require(SEC_PIT, "PIT")?, "PIT")?;
        let chips: [kvm_irqchip; 3] = [
            pod_read(dec.require(SEC_PIC_MASTER, "PIC master")?, "PIC master")?,
            pod_read(dec.require(SEC_PIC_SLAVE, "PIC slave")?, "PIC slave")?,
            pod_read(dec.require(SEC_IOAPIC, "IOAPIC")?, "IOAPIC")?,
        ];
        let saved_clock: kvm_clock_data = pod_read(dec.require(SEC_CLOCK, "clock")?, "clock")?;
        self.fd.set_pit2(&pit).map_err(|e| Error::backend("KVM_SET_PIT2", e))?;
        for chip in &chips {
            self.fd.set_irqchip(chip).map_err(|e| Error::backend("KVM_SET_IRQCHIP", e))?;
        }
        // Only the clock value: guest time continues from where it was saved.
        let clock = kvm_clock_data { clock: saved_clock.clock, ..Default::default() };
        self.fd.set_clock(&clock).map_err(|e| Error::backend("KVM_SET_CLOCK", e))
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>> {
        self.fd.get_dirty_log(slot, size as usize).map_err(|e| Error::backend("KVM_GET_DIRTY_LOG", e))
    }
}

/// An interrupt line backed by an irqfd: writing the eventfd injects an edge.
struct KvmIrqLine {
    evt: EventFd,
}

impl IrqLine for KvmIrqLine {
    fn trigger(&self) -> Result<()> {
        self.evt.write(1).map_err(|e| Error::backend("irqfd write", e))
    }
}
